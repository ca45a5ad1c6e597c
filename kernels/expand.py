"""Expanding quantized blocks to float32: dequantize (the compiled kernel where built, else the
NumPy reference), and the thread count kernels use by default. Imported by the package's public
API and by the dispatch object alike, so it imports neither."""
from __future__ import annotations

import os

import numpy as np

from . import reference

try:  # the Cython build is optional at import time: a source checkout without a build still works
    from . import _dequant
except ImportError:  # pragma: no cover - exercised only on unbuilt checkouts
    _dequant = None


def default_threads() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS; OpenMP fails to create (or crashes on) far more


def check_threads(threads: int | None, what: str = "threads") -> int | None:
    """threads itself when it is None (the default: every core we may use) or an integer in
    1..MAX_THREADS; anything else a ValueError naming it (OpenMP would crash on 100000)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"{what} must be an integer in 1..{MAX_THREADS} (or None: every core), got {threads!r}")
    return int(threads)


def dequantize(qt, threads: int | None = None) -> np.ndarray:
    """float32[rows, cols] values of `qt` (a QTensor) (bit-identical to gguf.quants.dequantize)."""
    check_threads(threads)
    if _dequant is not None:
        out = np.empty(qt.shape, dtype=np.float32)
        data = np.ascontiguousarray(qt.data)
        _dequant.dequantize_into(data, int(qt.qtype), out, threads or default_threads())
        return out
    return reference.dequantize(qt.data, qt.qtype, qt.shape)
