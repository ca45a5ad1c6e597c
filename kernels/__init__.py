"""Math on quantized GGUF blocks. Knows nothing about models or files.

Public API:
    QTensor(qtype, shape, data)      a 2-D weight as raw GGUF block bytes, uint8[rows, bytes_per_row]
    dequantize(qt) -> float32[rows, cols]
    matmul(x, qt, threads=None, backend="auto") -> x @ W.T   (x: float32[n, cols])

backend: "cython" and "numba" run fused kernels that read the quantized blocks once and never
expand the weights to float (activations are quantized to int8 on the fly for the block types,
as llama.cpp does); "numpy" dequantizes and calls BLAS; "auto" picks per type and batch size by a
measured table (kernels/backends.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from . import backends, formats
from .backends import BACKENDS
from .expand import MAX_THREADS, check_threads, default_threads, dequantize

__all__ = ["QTensor", "dequantize", "matmul", "default_threads", "check_threads", "MAX_THREADS", "GGMLQuantizationType"]


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

    @classmethod
    def view(cls, qtype: GGMLQuantizationType, shape: tuple[int, int], data: np.ndarray) -> "QTensor":
        """A QTensor without the checks, for hot paths whose arguments come from an already
        checked layout (the expert store makes one per expert read)."""
        qt = object.__new__(cls)
        object.__setattr__(qt, "qtype", qtype)
        object.__setattr__(qt, "shape", shape)
        object.__setattr__(qt, "data", data)
        return qt


def matmul(x: np.ndarray, qt: QTensor, threads: int | None = None, backend: str = "auto",
           out: np.ndarray | None = None) -> np.ndarray:
    """x @ W.T for x: float32[n, cols] and W = qt: returns float32[n, rows] (into `out` if given)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    check_threads(threads)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"matmul: x has shape {x.shape}, weight {qt.qtype.name}{list(qt.shape)} "
                         f"needs x of shape (n, {qt.shape[1]})")
    n, rows = x.shape[0], qt.shape[0]
    if out is None:
        out = np.empty((n, rows), dtype=np.float32)
    elif out.shape != (n, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be C-contiguous float32{[n, rows]}, got {out.dtype}{list(out.shape)}")
    if backend == "auto":
        backend = backends.choose(qt.qtype, n)
    if backend == "numpy":
        np.matmul(x, dequantize(qt, threads).T, out=out)
        return out
    kernel = backends.kernel_for(backend, qt.qtype)
    if kernel is None:
        raise ValueError(f"backend {backend!r} has no kernel for {qt.qtype.name} here "
                         f"(available: {', '.join(backends.available(qt.qtype))})")
    kernel.matmul_into(x, np.ascontiguousarray(qt.data), int(qt.qtype), out, threads or default_threads())
    return out
