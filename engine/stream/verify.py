"""Checks that what the engine reads from the model file is still the file it loaded.

    ident = FileIdentity.of(path)      # st_size, st_mtime_ns, st_ino, st_dev, recorded at load
    ident.check()                      # stat(path): replaced, rewritten or truncated -> ModelFileChangedError
    ident.check(fd)                    # fstat(fd): the file behind an open descriptor, the same way
    check_scales(qtensor, where)       # every block scale (f16 d, m, dmin; float weights' values) finite

A file changed under a running engine used to give wrong text silently (experts overwritten with
zeros) or end generation early (0xFF: NaN scales). Rewriting bytes in place changes the
modification time, replacing the file (a rename over it) the inode, truncating it the size: each
read batch of streamed experts (reader.py, after the read, in the reader thread) and each forward
call of the engine (runtime/engine.py) compare these with the values recorded at load. A stat is
~1 us, against milliseconds per forward step.

A resident (memory-mapped) model is checked at the start of each forward call, so a file
truncated before the call gives ModelFileChangedError; a truncation *during* a call still ends the
process with SIGBUS (the kernel's answer to touching a mapped page past the end of the file), as
llama.cpp does: only copying the weights in (stream=...) avoids that.

check_scales costs (measured on a shared 2-core VM, one thread): 5-10 us per part of the tiny MoE
test models' experts (64x256 Q8_0 / Q2_K / Q4_K), 190 us per streamed FFN of SmolLM2-135M (Q4_1,
3 x 1536x576, 1.66 MB: ~250k blocks, memory-bound: every cache line of the blocks is touched),
i.e. up to 5.7 ms per token when all 30 of its layers miss, against ~0.8 ms to read each of them
at 2 GB/s. It runs in the reader thread, after the read, with the GIL released by NumPy's loops,
so it overlaps the compute thread like the read does. The identity check is ~2 us (one fstat).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...kernels import QTensor, formats
from ..errors import ModelFileChangedError, NonFiniteWeightsError

FIELDS = ("st_size", "st_mtime_ns", "st_ino", "st_dev")


@dataclass(frozen=True)
class FileIdentity:
    path: str
    st_size: int
    st_mtime_ns: int
    st_ino: int
    st_dev: int

    @classmethod
    def of(cls, path, fd: int | None = None) -> "FileIdentity":
        st = os.fstat(fd) if fd is not None else os.stat(path)
        return cls(str(path), *(getattr(st, k) for k in FIELDS))

    def changes(self, fd: int | None = None) -> list[str]:
        """What differs now (by name, or behind fd): ["st_size 1234 -> 0", ...]; [] if nothing."""
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.path)
        except FileNotFoundError:
            return ["the file was removed"]
        return [f"{k} {getattr(self, k)} -> {getattr(st, k)}" for k in FIELDS if getattr(st, k) != getattr(self, k)]

    def check(self, fd: int | None = None, when: str = "") -> None:
        changed = self.changes(fd)
        if changed:
            raise ModelFileChangedError(f"{self.path}: the model file changed since it was loaded "
                                        f"({', '.join(changed)}){' ' + when if when else ''}; "
                                        f"reload the engine to use the new file")


def _scale_fields(dtype: np.dtype) -> list[tuple[int, int, int]]:
    """(byte offset, bytes, exponent mask) of each floating-point field of a block: the scales of
    a quantized block (d, m, dmin: f16), the value of a float one (f16, bf16, f32)."""
    out = []
    for name, (ftype, offset) in dtype.fields.items():
        if ftype == np.dtype("<f2"):
            out.append((offset, 2, 0x7C00))
        elif ftype == np.dtype("<f4"):
            out.append((offset, 4, 0x7F800000))
        elif name == "bits" and ftype == np.dtype("<u2"):  # BF16 has no NumPy type: the bits
            out.append((offset, 2, 0x7F80))
    return out


SCALE_FIELDS = {qtype: _scale_fields(dt) for qtype, dt in formats.BLOCK_DTYPES.items()}


def check_scales(t: QTensor, where: str) -> None:
    """Raise NonFiniteWeightsError if any block scale of t is NaN or infinite (all exponent bits
    set), naming `where` (file, tensor, expert) and the first bad block. Vectorised: one strided
    integer view per scale field, no copy of the blocks."""
    block = formats.BLOCK_DTYPES[t.qtype].itemsize
    blocks = t.data.reshape(-1, block)  # uint8[n_blocks, block bytes]
    for offset, size, mask in SCALE_FIELDS[t.qtype]:
        bits = blocks[:, offset:offset + size].view(np.uint16 if size == 2 else np.uint32)  # [n_blocks, 1]
        bad = (bits & mask) == mask  # every exponent bit set: NaN or infinite
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NonFiniteWeightsError(f"{where}: block {i} of {blocks.shape[0]} has a NaN or infinite scale "
                                        f"(bits 0x{int(bits[i, 0]):0{2 * size}x}); the file is corrupt")
