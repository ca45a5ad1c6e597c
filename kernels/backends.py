"""Which kernel runs a matmul: the registry of backends and the measured choice for "auto".

A backend module exposes SUPPORTED (the GGML type values it handles) and
matmul_into(x float32[n, cols], w uint8[rows, row_bytes], qtype int, out float32[n, rows], threads).
"cython" is two compiled modules (k-quants, legacy block types); "numba" is JIT-compiled on first
use; "numpy" dequantizes and calls BLAS (always available, and the fallback).

"auto" picks, per weight type and batch size, the backend that measured fastest on this machine:
the table lives in backend_table.json beside this file, written by `weightstream bench kernels
--write-table`. Without a measurement for a case it prefers cython, then numba, then numpy.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

BACKENDS = ("auto", "numpy", "cython", "numba")
# module names relative to this package (weightstream.kernels)
_MODULES = {"cython": ("._kquants", "._legacy"), "numba": (".numba.matmul",)}
TABLE_PATH = Path(__file__).with_name("backend_table.json")
N_BUCKETS = (1, 8, 64, 512)  # a batch of n rows is looked up under the smallest bucket >= n

_loaded: dict[str, dict[int, object]] = {}  # backend -> {qtype value: module}
_table: dict[str, dict[str, str]] | None = None


def _kernels_of(backend: str) -> dict[int, object]:
    """{qtype: module} for a backend, importing its modules once (missing modules: no kernels)."""
    if backend not in _loaded:
        found: dict[int, object] = {}
        for name in _MODULES.get(backend, ()):
            try:
                module = importlib.import_module(name, __package__)
            except ImportError:
                continue
            for q in module.SUPPORTED:
                found.setdefault(int(q), module)
        _loaded[backend] = found
    return _loaded[backend]


def kernel_for(backend: str, qtype: GGMLQuantizationType):
    """The module implementing qtype in backend, or None."""
    return _kernels_of(backend).get(int(qtype))


def available(qtype: GGMLQuantizationType) -> list[str]:
    """Backends that can multiply qtype here (numpy always can)."""
    return [b for b in ("cython", "numba") if kernel_for(b, qtype) is not None] + ["numpy"]


def has_fused_kernel(qtype: GGMLQuantizationType, backend: str = "auto") -> bool:
    """Whether `backend` (any compiled one, for "auto") multiplies qtype without expanding it."""
    if backend == "numpy":
        return False
    if backend == "auto":
        return len(available(qtype)) > 1
    return kernel_for(backend, qtype) is not None


def bucket(n: int) -> int:
    return next((b for b in N_BUCKETS if n <= b), N_BUCKETS[-1])


def _measured() -> dict[str, dict[str, str]]:
    global _table
    if _table is None:
        try:
            _table = json.loads(TABLE_PATH.read_text())["best"]
        except (OSError, ValueError, KeyError):
            _table = {}
    return _table


def choose(qtype: GGMLQuantizationType, n: int) -> str:
    """The backend "auto" uses for qtype at batch size n."""
    qtype = GGMLQuantizationType(qtype)
    best = _measured().get(qtype.name, {}).get(str(bucket(n)))
    if best == "numpy" or (best is not None and kernel_for(best, qtype) is not None):
        return best
    return available(qtype)[0]


class KernelCache:
    """(qtype, n) -> the fused kernel module `backend` uses (None: NumPy), looked up once. At
    decode a step makes hundreds of small matmuls; choosing each time would cost as much as a
    small expert's arithmetic."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._cache: dict[tuple[int, int], object] = {}

    def __call__(self, qtype, n: int):
        key = (int(qtype), n)
        try:
            return self._cache[key]
        except KeyError:
            name = choose(qtype, n) if self.backend == "auto" else self.backend
            kernel = kernel_for(name, qtype) if name != "numpy" else None
            self._cache[key] = kernel
            return kernel

    def matmul(self, x: np.ndarray, qt, threads: int) -> np.ndarray:
        """x @ W.T for x: float32[n, cols] and W = qt, through the cached kernel; where there is
        none, through kernels.matmul (NumPy under "auto"; a named backend's own clear error)."""
        kernel = self(qt.qtype, x.shape[0])
        if kernel is None:
            from . import matmul  # kernels/__init__ imports this module

            return matmul(x, qt, threads, "numpy" if self.backend == "auto" else self.backend)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
        kernel.matmul_into(x, qt.data, int(qt.qtype), out, threads)
        return out


def write_table(best: dict[str, dict[str, str]], measurements: list[dict], machine: dict) -> Path:
    """Store the measured choice (type -> {n bucket: backend}) with the figures it came from."""
    global _table
    tmp = TABLE_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine, "best": best, "measurements": measurements}, indent=1))
    tmp.replace(TABLE_PATH)
    _table = best
    return TABLE_PATH
