"""Which kernel runs a matmul: the Backend protocol, the registry of backends, the one dispatch
object (KernelCache) and the measured choice for "auto".

A backend (``Backend``) multiplies x float32[n, cols] by W.T, W being uint8[rows, row_bytes] of
GGUF blocks, for the types it ``supports``; ``many_kernel(qtype)`` is its optional batched-decode
capability (``matvec_many_into``: one activation row through each of several weights in one
call), None where it has none. "cython" is two compiled modules (k-quants, legacy block types);
"numba" is JIT-compiled on first use; "amx" is the k-quants on AMX-BF16 tiles for many activation
rows (prefill; bf16 products, not the Q8_K path; no types on CPUs without AMX-BF16); "numpy"
dequantizes and calls BLAS (always available, the fallback; kernels.matmul runs it, so it is not
in REGISTRY).

"auto" picks, per weight type and batch size, the backend that measured fastest: `weightstream
bench kernels --write-table` writes the table for this CPU model to the user's cache
(``$WEIGHTSTREAM_CACHE`` or ``~/.cache/weightstream``, ``backend_table-<cpu model>.json``);
without one, the table shipped beside this file for the kernels' ISA (read-only: one measured on
AVX-512 with AMX, one for AVX2) applies; its entries may name
backends in order of preference ("amx,cython": AMX where the CPU has it, else Cython). Without a
measurement for a case it prefers cython, then numba, then amx, then numpy.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from gguf import GGMLQuantizationType

from .expand import dequantize

BACKENDS = ("auto", "numpy", "cython", "numba", "amx")
# the shipped defaults, never written: one measured on an AVX-512 + AMX CPU (Intel Sapphire
# Rapids), one for AVX2 builds (AMD Zen 3), where the first's "amx,numpy" at 512 rows sent a
# prompt's Q4_K / Q6_K matrices to NumPy: a 30B-A3B pp512 13.0 tok/s against 18.0 with Cython
# (the first now says "amx,cython": on AVX-512 without AMX, Zen 4, pp512 24.9 -> 34.7 tok/s)
SHIPPED_TABLE = Path(__file__).with_name("backend_table.json")
SHIPPED_TABLE_AVX2 = Path(__file__).with_name("backend_table_avx2.json")
N_BUCKETS = (1, 8, 64, 512)  # a batch of n rows is looked up under the smallest bucket >= n


class Backend(Protocol):
    name: str

    def supports(self, qtype: GGMLQuantizationType | int) -> bool: ...

    def kernel_for(self, qtype: GGMLQuantizationType | int):
        """The object whose matmul_into multiplies qtype (what KernelCache caches), or None."""

    def matmul_into(self, x: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray, threads: int) -> None:
        """out[n, rows] = x[n, cols] @ W.T (all C-contiguous; w: uint8[rows, row_bytes])."""

    def many_kernel(self, qtype: GGMLQuantizationType | int) -> Callable | None:
        """matvec_many_into(x float32[t, cols], ws list of t weights, qtype, out float32[t, rows],
        threads) for qtype, each row with the bits matmul_into gives it alone; None if absent."""


class ModuleBackend:
    """A backend made of kernel modules, each exposing SUPPORTED (GGML type values) and
    matmul_into (and optionally matvec_many_supported / matvec_many_into). Modules are imported
    on first use; one that cannot be imported (an unbuilt checkout) contributes no types."""

    def __init__(self, name: str, modules: tuple[str, ...]):
        self.name = name
        self._module_names = modules  # relative to this package (weightstream.kernels)
        self._by_type: dict[int, object] | None = None

    def _modules(self) -> dict[int, object]:
        if self._by_type is None:
            found: dict[int, object] = {}
            for name in self._module_names:
                try:
                    module = importlib.import_module(name, __package__)
                except ImportError:
                    continue
                for q in module.SUPPORTED:
                    found.setdefault(int(q), module)
            self._by_type = found
        return self._by_type

    def kernel_for(self, qtype):
        """The module implementing qtype, or None."""
        return self._modules().get(int(qtype))

    def supports(self, qtype) -> bool:
        return self.kernel_for(qtype) is not None

    def matmul_into(self, x, w, qtype, out, threads) -> None:
        self.kernel_for(qtype).matmul_into(x, w, int(qtype), out, threads)

    def many_kernel(self, qtype):
        module = self.kernel_for(qtype)
        if module is None or not hasattr(module, "matvec_many_into"):
            return None
        return module.matvec_many_into if module.matvec_many_supported(int(qtype)) else None


REGISTRY: dict[str, Backend] = {
    "cython": ModuleBackend("cython", ("._kquants", "._legacy")),
    "numba": ModuleBackend("numba", (".numba.matmul",)),
    # k-quant prefill on AMX-BF16 tiles (Cython too, not the Q8_K path): no types where the CPU
    # or the build lacks AMX-BF16
    "amx": ModuleBackend("amx", ("._amx",)),
}


def kernel_for(backend: str, qtype: GGMLQuantizationType):
    """The module implementing qtype in backend, or None."""
    b = REGISTRY.get(backend)
    return b.kernel_for(qtype) if b is not None else None


def available(qtype: GGMLQuantizationType) -> list[str]:
    """Backends that can multiply qtype here (numpy always can)."""
    return [name for name, b in REGISTRY.items() if b.supports(qtype)] + ["numpy"]


def has_fused_kernel(qtype: GGMLQuantizationType, backend: str = "auto") -> bool:
    """Whether `backend` (any compiled one, for "auto") multiplies qtype without expanding it."""
    if backend == "numpy":
        return False
    if backend == "auto":
        return len(available(qtype)) > 1
    return kernel_for(backend, qtype) is not None


def bucket(n: int) -> int:
    return next((b for b in N_BUCKETS if n <= b), N_BUCKETS[-1])


# ---------------------------------------------------------------------------
# The measured table: the user's, for this CPU model, else the shipped default
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """$WEIGHTSTREAM_CACHE, else ~/.cache/weightstream (engine/assets.py's convention; kernels
    does not import engine). Not created here: only write_table needs it to exist."""
    return Path(os.environ.get("WEIGHTSTREAM_CACHE") or Path.home() / ".cache" / "weightstream")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return "unknown"


@lru_cache(maxsize=1)
def _cpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "unknown"


def user_table_path() -> Path:
    """Where this CPU model's measured table lives in the user's cache (looked up on every "auto"
    choice: the cache directory may change, the CPU does not)."""
    return cache_dir() / f"backend_table-{_cpu_slug()}.json"


_table: tuple[Path, dict[str, dict[str, str]]] | None = None  # (user table path, its "best")


def _measured() -> dict[str, dict[str, str]]:
    """type name -> {n bucket: backend}, read once per user table path."""
    global _table
    user = user_table_path()
    if _table is None or _table[0] != user:
        best: dict[str, dict[str, str]] = {}
        for path in (user, shipped_table()):
            try:
                best = json.loads(path.read_text())["best"]
                break
            except (OSError, ValueError, KeyError):
                continue
        _table = (user, best)
    return _table[1]


def shipped_table() -> Path:
    """The shipped table for this build's vector ISA (_kquants.ISA): the AVX2 one where the
    kernels were built for AVX2, else the AVX-512 machine's."""
    try:
        from . import _kquants
    except ImportError:
        return SHIPPED_TABLE
    return SHIPPED_TABLE_AVX2 if getattr(_kquants, "ISA", "") == "avx2" else SHIPPED_TABLE


def choose(qtype: GGMLQuantizationType, n: int) -> str:
    """The backend "auto" uses for qtype at batch size n: the table's entry for (type, n's bucket),
    a name or names in order of preference ("amx,cython": the first this machine has), else the
    first backend available."""
    qtype = GGMLQuantizationType(qtype)
    entry = _measured().get(qtype.name, {}).get(str(bucket(n)))
    for best in (entry.split(",") if entry else ()):
        if best == "numpy" or kernel_for(best, qtype) is not None:
            return best
    return available(qtype)[0]


def write_table(best: dict[str, dict[str, str]], measurements: list[dict], machine: dict) -> Path:
    """Store the measured choice (type -> {n bucket: backend}) with the figures it came from, as
    this CPU model's table in the user's cache (atomically: a temporary name, then os.replace)."""
    global _table
    path = user_table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"cpu_model": cpu_model(), "machine": machine, "best": best,
                               "measurements": measurements}, indent=1))
    os.replace(tmp, path)
    _table = (path, best)
    return path


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


class KernelCache:
    """(qtype, n) -> the fused kernel module `backend` uses (None: NumPy), looked up once. At
    decode a step makes hundreds of small matmuls; choosing each time would cost as much as a
    small expert's arithmetic."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._cache: dict[tuple[int, int], object] = {}
        self._many: dict[int, Callable | None] = {}
        self._moe: dict[tuple[int, int], Callable | None] = {}
        self._ffn: dict[tuple[int, int], Callable | None] = {}

    def _backend_name(self, qtype, n: int) -> str:
        return choose(qtype, n) if self.backend == "auto" else self.backend

    def __call__(self, qtype, n: int):
        key = (int(qtype), n)
        try:
            return self._cache[key]
        except KeyError:
            name = self._backend_name(qtype, n)
            kernel = kernel_for(name, qtype) if name != "numpy" else None
            self._cache[key] = kernel
            return kernel

    def many_kernel(self, qtype) -> Callable | None:
        """The batched-decode kernel (Backend.many_kernel) of the backend chosen for qtype at
        n = 1, or None where that backend has none for qtype (callers then run one matmul each)."""
        key = int(qtype)
        if key not in self._many:
            backend = REGISTRY.get(self._backend_name(qtype, 1))
            self._many[key] = backend.many_kernel(qtype) if backend is not None else None
        return self._many[key]

    def moe_kernel(self, qtype_gu, qtype_d) -> Callable | None:
        """The fused decode-step MoE kernel (moe_decode_into: every routed expert's gate/up,
        SwiGLU, down and the weighted sum in one call) where the kernel module that the backend
        uses at n = 1 for both types has one for them, else None (callers use many_kernel)."""
        return self._decode_call(self._moe, "moe_decode", qtype_gu, qtype_d)

    def ffn_kernel(self, qtype_gu, qtype_d) -> Callable | None:
        """The fused decode-step SwiGLU feed-forward (ffn_decode_into: gate/up, SwiGLU and down in
        one call, the bits of the three calls), as moe_kernel finds it, else None (callers make
        the three calls)."""
        return self._decode_call(self._ffn, "ffn_decode", qtype_gu, qtype_d)

    def _decode_call(self, cache: dict, name: str, qtype_gu, qtype_d) -> Callable | None:
        """The kernel module's <name>_into for (gate/up type, down type) where one module serves
        both types at n = 1 and its <name>_supported takes them, else None; once per key."""
        key = (int(qtype_gu), int(qtype_d))
        if key not in cache:
            modules = {self(q, 1) for q in key}
            module = modules.pop() if len(modules) == 1 else None
            fused = getattr(module, f"{name}_into", None)
            cache[key] = fused if fused is not None and getattr(module, f"{name}_supported")(*key) else None
        return cache[key]

    def matmul(self, x: np.ndarray, qt, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        """x @ W.T for x: float32[n, cols] and W = qt, through the cached kernel; where there is
        none, through kernels.matmul (NumPy under "auto"; a named backend's own clear error).
        out: a C-contiguous float32[n, rows] to write into (None: allocated)."""
        kernel = self(qt.qtype, x.shape[0])
        if kernel is None:  # NumPy: expand and call BLAS (what kernels.matmul does for "numpy")
            if self.backend not in ("auto", "numpy"):
                raise ValueError(f"backend {self.backend!r} has no kernel for {qt.qtype.name} here "
                                 f"(available: {', '.join(available(qt.qtype))})")
            x = np.ascontiguousarray(x, dtype=np.float32)
            if out is None:
                out = np.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
            np.matmul(x, dequantize(qt, threads).T, out=out)
            return out
        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
        kernel.matmul_into(x, qt.data, int(qt.qtype), out, threads)
        return out
