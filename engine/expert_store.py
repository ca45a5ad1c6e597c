"""Routed experts read from the GGUF file into a fixed pool of memory slots, on demand.

One expert of one layer = its rows of the three stacked tensors ffn_gate_exps, ffn_up_exps and
ffn_down_exps: three contiguous byte ranges of the file, read with three preads (they release the
GIL) straight into one slot. The slots are allocated once, page-aligned, so a
token allocates nothing and an O_DIRECT reader can use them as they are. Which expert to give up
when the pool is full is the policy's call (engine/cache_policy.py).

    store = ExpertStore(gguf_file, n_slots=64, policy="lru")
    gate, up, down = store.get(layer, expert)      # QTensors viewing a slot
    store.stats                                    # hits, misses, bytes read

This step reads synchronously on a miss; the prefetcher (reads ahead of use on I/O threads)
builds on it.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from kernels import QTensor

from .cache_policy import make_policy
from .gguf_file import GGUFError, GGUFFile, TensorInfo

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class ExpertLayout:
    """Where one layer's experts live: the stacked gate, up and down tensors."""

    layer: int
    parts: tuple[TensorInfo, TensorInfo, TensorInfo]

    @property
    def n_expert(self) -> int:
        return self.parts[0].shape[0]

    def part_bytes(self, i: int) -> int:
        """Bytes of one expert's slice of part i (its rows x row_bytes)."""
        info = self.parts[i]
        return info.shape[1] * info.row_bytes

    @property
    def expert_bytes(self) -> int:
        return sum(self.part_bytes(i) for i in range(3))


def expert_layouts(f: GGUFFile) -> dict[int, ExpertLayout]:
    """{layer: layout} for every layer with routed experts."""
    layouts = {}
    for name in f.tensors:
        if name.startswith("blk.") and name.endswith(f".{EXPERT_TENSORS[0]}.weight"):
            layer = int(name.split(".")[1])
            parts = tuple(f.info(f"blk.{layer}.{t}.weight") for t in EXPERT_TENSORS)
            if len({p.shape[0] for p in parts}) != 1:
                raise GGUFError(f"{f.path}: layer {layer}'s expert tensors disagree on the expert count: "
                                f"{[p.shape for p in parts]}")
            layouts[layer] = ExpertLayout(layer, parts)
    return layouts


class SlotPool:
    """n_slots buffers of slot_bytes each (rounded up to whole pages), allocated once."""

    def __init__(self, n_slots: int, slot_bytes: int):
        if n_slots < 1:
            raise ValueError(f"SlotPool: need at least one slot, got {n_slots}")
        self.stride = -(-slot_bytes // PAGE) * PAGE
        raw = np.empty(n_slots * self.stride + PAGE, dtype=np.uint8)  # one allocation; pages touched on first read
        start = -raw.ctypes.data % PAGE
        self.slots = raw[start:start + n_slots * self.stride].reshape(n_slots, self.stride)  # uint8[n_slots, stride]

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def close(self) -> None:
        self.slots = None  # the memory goes when the last view of a slot does


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    reads: int = 0
    per_layer: dict = field(default_factory=dict)  # layer -> [hits, misses]

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class ExpertStore:
    """A cache of experts in a SlotPool: get(layer, expert) -> (gate, up, down) QTensors."""

    def __init__(self, f: GGUFFile, n_slots: int, policy: str = "lru"):
        self.path = f.path
        self.layouts = expert_layouts(f)
        if not self.layouts:
            raise GGUFError(f"{f.path}: no routed experts (*_exps tensors) to stream")
        self.slot_bytes = max(lay.expert_bytes for lay in self.layouts.values())
        self.pool = SlotPool(n_slots, self.slot_bytes)
        self.policy = make_policy(policy, n_slots)
        self._fds = {p: os.open(p, os.O_RDONLY) for p in {info.path for lay in self.layouts.values() for info in lay.parts}}
        self._slot_of: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
        self._free = list(range(n_slots - 1, -1, -1))
        self.stats = StoreStats()

    @property
    def n_slots(self) -> int:
        return self.pool.slots.shape[0]

    def get(self, layer: int, expert: int) -> tuple[QTensor, QTensor, QTensor]:
        key = (layer, expert)
        counts = self.stats.per_layer.setdefault(layer, [0, 0])
        slot = self._slot_of.get(key)
        if slot is not None:
            self.stats.hits += 1
            counts[0] += 1
            self.policy.touch(key)
        else:
            self.stats.misses += 1
            counts[1] += 1
            slot = self._free.pop() if self._free else self._evict()
            self._read(key, self.pool.slots[slot])
            self._slot_of[key] = slot
            self.policy.insert(key)
        return self._views(key, self.pool.slots[slot])

    def _evict(self) -> int:
        old = self.policy.victim()
        self.policy.remove(old)
        return self._slot_of.pop(old)

    def _read(self, key: tuple[int, int], slot: np.ndarray) -> None:
        layer, expert = key
        lay = self.layouts.get(layer)
        if lay is None or not 0 <= expert < lay.n_expert:
            raise KeyError(f"{self.path}: no expert {expert} in layer {layer}")
        pos = 0
        for i, info in enumerate(lay.parts):
            n = lay.part_bytes(i)
            offset = info.offset + expert * n
            got = os.preadv(self._fds[info.path], [slot[pos:pos + n]], offset)
            if got != n:
                raise OSError(f"{info.path}: short read of {info.name} expert {expert} at offset {offset}: "
                              f"{got} of {n} bytes (file truncated?)")
            pos += n
            self.stats.reads += 1
        self.stats.bytes_read += pos

    def _views(self, key: tuple[int, int], slot: np.ndarray) -> tuple[QTensor, QTensor, QTensor]:
        lay, pos, out = self.layouts[key[0]], 0, []
        for i, info in enumerate(lay.parts):
            rows, n = info.shape[1], lay.part_bytes(i)
            out.append(QTensor(info.qtype, info.shape[1:], slot[pos:pos + n].reshape(rows, info.row_bytes)))
            pos += n
        return tuple(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self.pool.close()
