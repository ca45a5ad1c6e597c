"""The expert cache's memory: a fixed pool of page-aligned slots, allocated (and touched) once."""
from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE


class SlotPool:
    """n_slots buffers of slot_bytes each (rounded up to whole pages), allocated once."""

    def __init__(self, n_slots: int, slot_bytes: int):
        if n_slots < 1:
            raise ValueError(f"SlotPool: need at least one slot, got {n_slots}")
        self.stride = -(-slot_bytes // PAGE) * PAGE
        raw = np.empty(n_slots * self.stride + PAGE, dtype=np.uint8)  # one allocation
        # touch every page now: a read into a never-touched slot page-faults its pages in (zeroing,
        # cgroup charge, the mm lock shared with the compute thread), which made reads into fresh
        # slots ~3x slower than into reused ones (bench/e2e.py at 50-100% budgets); the budget
        # counts these bytes anyway
        raw[::PAGE] = 0
        start = -raw.ctypes.data % PAGE
        self.slots = raw[start:start + n_slots * self.stride].reshape(n_slots, self.stride)  # uint8[n_slots, stride]

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def close(self) -> None:
        self.slots = None  # the memory goes when the last view of a slot does
