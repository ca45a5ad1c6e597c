"""Math on quantized GGUF blocks. Knows nothing about models or files.

Public API:
    QTensor(qtype, shape, data)      a 2-D weight as raw GGUF block bytes, uint8[rows, bytes_per_row]
    dequantize(qt) -> float32[rows, cols]
    matmul(x, qt, threads=None, backend="auto") -> x @ W.T   (x: float32[n, cols])

In this version matmul dequantizes and multiplies in NumPy; fused kernels replace it behind the
same call (issue 3).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from . import formats, reference

try:  # the Cython build is optional at import time: a source checkout without a build still works
    from . import _dequant
except ImportError:  # pragma: no cover - exercised only on unbuilt checkouts
    _dequant = None

__all__ = ["QTensor", "dequantize", "matmul", "default_threads", "GGMLQuantizationType"]

BACKENDS = ("auto", "numpy", "cython", "numba")


def default_threads() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class QTensor:
    """A 2-D weight matrix stored as GGUF blocks.

    qtype: the block type; shape: logical (rows, cols); data: uint8[rows, bytes_per_row], each row
    holding cols // block_elements blocks (GGUF stores a matrix row-major, one row after another).
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self):
        qtype = GGMLQuantizationType(self.qtype)
        object.__setattr__(self, "qtype", qtype)
        if qtype not in formats.SUPPORTED_TYPES:
            raise ValueError(f"unsupported tensor type {qtype.name}")
        if len(self.shape) != 2:
            raise ValueError(f"QTensor shape must be (rows, cols), got {self.shape}")
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        expected = (rows, formats.row_bytes(qtype, cols))
        if self.data.dtype != np.uint8 or self.data.shape != expected:
            raise ValueError(f"{qtype.name} tensor of shape {self.shape} needs uint8{list(expected)} "
                             f"block bytes, got {self.data.dtype}{list(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def dequantize(qt: QTensor, threads: int | None = None) -> np.ndarray:
    """float32[rows, cols] values of `qt` (bit-identical to gguf.quants.dequantize)."""
    if _dequant is not None:
        out = np.empty(qt.shape, dtype=np.float32)
        data = np.ascontiguousarray(qt.data)
        _dequant.dequantize_into(data, int(qt.qtype), out, threads or default_threads())
        return out
    return reference.dequantize(qt.data, qt.qtype, qt.shape)


def matmul(x: np.ndarray, qt: QTensor, threads: int | None = None, backend: str = "auto") -> np.ndarray:
    """x @ W.T for x: float32[n, cols] and W = qt: returns float32[n, rows]."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"matmul: x has shape {x.shape}, weight {qt.qtype.name}{list(qt.shape)} "
                         f"needs x of shape (n, {qt.shape[1]})")
    if backend == "numpy":
        return reference.matmul_ref(x, qt.data, qt.qtype, qt.shape)
    return x @ dequantize(qt, threads).T
