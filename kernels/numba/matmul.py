"""Numba fused dequantize-matmul kernels: out = x @ W.T straight on GGUF block bytes.

Public: ``SUPPORTED`` and ``matmul_into(x, w, qtype, out, threads)``. The wrapper checks its
inputs and raises ValueError naming the problem; the ``_*_kernel`` cores in
``kquants.py`` (k-quants) and ``legacy.py`` (32-element and dense types) trust
theirs (stumpy's ``stump`` / ``_stump``).

Strategy per type (measured; see the issue's report), ``strategy()`` naming the tier:

* Q2_K..Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 on a CPU with AVX-512 BW + VNNI or with AVX2 + FMA +
  F16C (``SIMD_TIER`` 'avx512' / 'avx2', ``legacy.ISA``): activations quantized to int8 here,
  exactly as ``weightstream.kernels.quantize`` (Q8_K / Q8_0 / Q8_1), and integer dot products
  written as explicit LLVM vector IR (``vpmaddubsw`` + ``vpmaddwd``, ``vpdpbusd`` with VNNI), 64
  bytes a product on AVX-512, 32 on AVX2 (e.g. AMD Zen 3). Reference:
  ``weightstream.kernels.quantize.matmul_q8_ref``.
* Q2_K..Q6_K without either (or ``WEIGHTSTREAM_NUMBA_SIMD=0``): Q8_K activations, each super-block
  unpacked once to int16 with its scales folded in and dotted with every activation row in
  plain Numba loops (LLVM vectorises them). Reference: ``weightstream.kernels.quantize.matmul_q8_ref``.
* F32, F16, BF16 (and the 32-element types without a SIMD tier): float32 activations, weights
  dequantized exactly into a small float buffer, then dotted. Reference:
  ``weightstream.kernels.reference.matmul_ref``.

All kernels split rows over threads with ``prange`` (16 rows per task) and reuse each unpacked
block across the activation rows of a tile (``tile_rows``: the tile's int8 activations stay in
L2). Every core is ``cache=True``: the first call in a fresh environment compiles (seconds per
type), later processes load the cache.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .. import formats, traits
from . import kquants as kq
from . import legacy as lg
from .legacy import F32, JIT, round_f16, tile_rows

__all__ = ["SUPPORTED", "SIMD_TIER", "HAVE_SIMD", "matmul_into", "quantize_q8_k", "quantize_q8_0", "strategy"]

SUPPORTED: frozenset[T] = traits.types_on("numba")


def _simd_tier() -> str | None:
    """The SIMD kernels' instruction set ('avx512' or 'avx2', legacy.ISA) where they may run: the
    host has one and Numba compiles for the host CPU; None: the plain-loop tiers."""
    if os.environ.get("WEIGHTSTREAM_NUMBA_SIMD", "1") == "0":
        return None
    if numba.config.CPU_NAME not in (None, "host"):
        return None  # e.g. NUMBA_CPU_NAME=generic for a portable cache: keep to plain loops
    return lg.ISA


SIMD_TIER = _simd_tier()
HAVE_SIMD = SIMD_TIER is not None

_K_QUANTS = traits.types_on("numba", traits.K_QUANT)
_LEGACY = traits.types_on("numba", traits.LEGACY)


def strategy(qtype, simd: bool = HAVE_SIMD) -> str:
    """Which kernel tier runs qtype: 'avx512-int8' / 'avx2-int8' (the SIMD kernels, SIMD_TIER),
    'int16' (Q8_K activations, plain loops) or 'float' (float32 activations)."""
    qt = T(qtype)
    if simd and HAVE_SIMD and (qt.name in kq.SIMD_KERNELS or qt.name in lg.SIMD_KERNELS):
        return f"{SIMD_TIER}-int8"
    return "int16" if qt in _K_QUANTS else "float"


# ---------------------------------------------------------------------------
# Activation quantizers (bit-exact with weightstream.kernels.quantize; no fastmath)
# ---------------------------------------------------------------------------


_IDENTITY_256 = np.arange(256, dtype=np.int64)


# The quantizers scan a row's bits as integers (xb: x viewed as uint32): without fastmath LLVM
# keeps float reductions (the running |max|, a NaN test by summing v - v) as serial chains of
# 3-4 cycles an element, while integer max / or reductions vectorise. For finite values the
# integer order of |v|'s bits is the float order; the exponent field's max is 0xFF exactly when
# some value is an Inf or a NaN. (2048 floats, Zen 3, the call alone: Q8_K 7.0 -> 3.9 us, Q8_0
# 8.6 -> 5.2.)
_ABS = np.uint32(0x7FFFFFFF)
_EXP = np.uint32(0x7F800000)


@njit(inline="always")
def _abs_max_bits(xb, i, o, ne):
    """(bits of the largest |v| over x[i, o:o + ne], the largest exponent field seen)."""
    amax = np.uint32(0)
    emax = np.uint32(0)
    for k in range(ne):
        u = xb[i, o + k]
        amax = max(amax, u & _ABS)
        emax = max(emax, u & _EXP)
    return amax, emax


@njit(inline="always")
def _q8_k_row(x, xb, i, pos, qs, d, bsums):
    """Row i of x to Q8_K (see _quantize_q8_k); True where it holds a NaN or Inf."""
    cols = x.shape[1]
    emax = np.uint32(0)
    for b in range(cols // 256):
        o = 256 * b
        abits, e = _abs_max_bits(xb, i, o, 256)
        emax = max(emax, e)
        if abits == 0:
            qs[b, i, :] = 0
            bsums[b, i, :] = 0
            d[b, i] = F32(0.0)
            continue
        vmax = F32(0.0)
        for k in range(256):  # the first value of that magnitude wins, as the C loop
            if xb[i, o + k] & _ABS == abits:
                vmax = x[i, o + k]
                break
        iscale = F32(-127.0) / vmax
        for s in range(16):
            acc = 0
            for k in range(16):
                q = np.int32(min(np.rint(iscale * x[i, o + 16 * s + k]), F32(127.0)))
                qs[b, i, pos[16 * s + k]] = q
                acc += q
            bsums[b, i, s] = acc
        d[b, i] = F32(1.0) / iscale
    return emax == _EXP


@njit(parallel=True, error_model="numpy", **JIT)  # a row's 1 / 0 is Inf, not an exception (as in prange)
def _quantize_q8_k(x, xb, pos, qs, d, bsums, bad, threads):
    """x float32[n, cols] -> block-major qs int8[nb, n, 256] (element k of a block stored at
    pos[k]), d float32[nb, n], bsums int16[nb, n, 16] (nb = cols // 256); bad uint8[n]: 1 where
    row i holds a NaN or Inf, which the int8 quants lose (see _nan_rows). Returns how many
    rows do (a test of the count is cheaper than bad.any() on every call). One row or one
    thread: a plain loop (see SERIAL)."""
    n = x.shape[0]
    nbad = 0
    if threads == 1 or n == 1:
        for i in range(n):
            row_bad = _q8_k_row(x, xb, i, pos, qs, d, bsums)
            bad[i] = row_bad
            nbad += np.int64(row_bad)
    else:
        for i in prange(n):
            row_bad = _q8_k_row(x, xb, i, pos, qs, d, bsums)
            bad[i] = row_bad
            nbad += np.int64(row_bad)
    return nbad


@njit(inline="always")
def _q8_0_row(x, xb, i, nsplit, qs, d, qsum):
    """Row i of x to Q8_0 (see _quantize_q8_0); True where it holds a NaN or Inf."""
    cols = x.shape[1]
    emax = np.uint32(0)
    for b in range(cols // 32):
        o = 32 * b
        abits, e = _abs_max_bits(xb, i, o, 32)
        emax = max(emax, e)
        db = F32(0.0)
        for k in range(32):  # the float of those bits: the largest magnitude
            if xb[i, o + k] & _ABS == abits:
                db = abs(x[i, o + k])
                break
        db = db / F32(127.0)
        inv = F32(1.0) / db if db != F32(0.0) else F32(0.0)
        # where the block's two halves go: (block, byte) of elements 0 and 16; its scales
        b_s = b
        if b < nsplit:
            h = b & 1
            b_lo, o_lo, b_hi, o_hi = b - h, 16 * h, b - h + 1, 16 * h
            b_s = b - b % 8 + h * 4 + b % 8 // 2  # legacy.SCALE_ORDER within the group
        else:
            b_lo, o_lo, b_hi, o_hi = b, 0, b, 16
        acc = 0
        for k in range(32):
            v = x[i, o + k] * inv
            q = np.int32(np.floor(abs(v) + F32(0.5)))  # roundf (half away from 0), in float32
            q = q if v >= F32(0.0) else -q
            if k < 16:
                qs[b_lo, i, o_lo + k] = q
            else:
                qs[b_hi, i, o_hi + k - 16] = q
            acc += q
        qsum[i, b_s] = acc
        d[i, b_s] = round_f16(db)
    return emax == _EXP


@njit(parallel=True, error_model="numpy", **JIT)  # a row's 1 / 0 is Inf, not an exception (as in prange)
def _quantize_q8_0(x, xb, nsplit, qs, d, qsum, bad, threads):
    """x float32[n, cols] -> block-major qs int8[nb, n, 32] (blocks b < nsplit in legacy's split
    order: block 2p + h's elements 0..15 at qs[2p, i, 16h:], 16..31 at qs[2p + 1, i, 16h:], its
    d and qsum at legacy.SCALE_ORDER's place in its group of 8), d float32[n, nb] (fp16-rounded,
    as stored in block_q8_0 / block_q8_1), qsum int32[n, nb] (Q8_1's s is d * qsum), nb = cols //
    32; bad uint8[n]: 1 where row i holds a NaN or Inf; returns how many (as _quantize_q8_k)."""
    n = x.shape[0]
    nbad = 0
    if threads == 1 or n == 1:
        for i in range(n):
            row_bad = _q8_0_row(x, xb, i, nsplit, qs, d, qsum)
            bad[i] = row_bad
            nbad += np.int64(row_bad)
    else:
        for i in prange(n):
            row_bad = _q8_0_row(x, xb, i, nsplit, qs, d, qsum)
            bad[i] = row_bad
            nbad += np.int64(row_bad)
    return nbad


def quantize_q8_k(x: np.ndarray, perm: np.ndarray | None = None, bad: np.ndarray | None = None):
    """Q8_K of x as weightstream.kernels.quantize.quantize_q8_k, block-major: (qs int8[nb, n, 256],
    d float32[nb, n], bsums int16[nb, n, 16]). With `perm`, qs[b, i, k] is element perm[k].
    bad: uint8[n] to receive the rows holding a NaN or Inf (None: not kept)."""
    pos = _IDENTITY_256 if perm is None else np.argsort(perm)
    return _quantize_q8_k_at(x, pos, bad, numba.get_num_threads())[:3]


def _quantize_q8_k_at(x, pos, bad, threads):
    """quantize_q8_k storing element k at pos[k] (argsort of its perm), and the number of rows
    holding a NaN or Inf."""
    n, cols = x.shape
    nb = cols // 256
    qs = np.empty((nb, n, 256), np.int8)
    d = np.empty((nb, n), np.float32)
    bsums = np.empty((nb, n, 16), np.int16)
    nbad = _quantize_q8_k(x, x.view(np.uint32), pos, qs, d, bsums, np.empty(n, np.uint8) if bad is None else bad,
                          threads)
    return qs, d, bsums, nbad


# each SIMD k-quant kernel with the positions of its activation order, argsorted once here rather
# than per call (a few microseconds: a tenth of a 768x2048 decode product)
_K_SIMD = {name: (kernel, _IDENTITY_256 if perm is None else np.argsort(perm))
           for name, (kernel, perm) in kq.SIMD_KERNELS.items()}


def quantize_q8_0(x: np.ndarray, bad: np.ndarray | None = None, nsplit: int = 0):
    """Q8_0 of x as weightstream.kernels.quantize.quantize_q8_0: (qs int8[nb, n, 32] block-major,
    d float32[n, nb], qsum int32[n, nb]); Q8_1's quants and d are the same. bad: as quantize_q8_k;
    nsplit: leading blocks stored in split order (legacy.split_blocks; 0: natural order)."""
    return _quantize_q8_0_counted(x, bad, nsplit, numba.get_num_threads())[:3]


def _quantize_q8_0_counted(x, bad, nsplit, threads):
    """quantize_q8_0, and the number of rows holding a NaN or Inf."""
    n, cols = x.shape
    nb = cols // 32
    qs = np.empty((nb, n, 32), np.int8)
    d = np.empty((n, nb), np.float32)
    qsum = np.empty((n, nb), np.int32)
    nbad = _quantize_q8_0(x, x.view(np.uint32), nsplit, qs, d, qsum, np.empty(n, np.uint8) if bad is None else bad,
                          threads)
    return qs, d, qsum, nbad


# ---------------------------------------------------------------------------
# Public wrapper
# ---------------------------------------------------------------------------


# qtype -> (type, block elements, block bytes) of the supported types: T(qtype) and
# formats.block_size cost ~1 us each a call
_TYPE_INFO = {int(t): (t, *formats.block_size(t)) for t in SUPPORTED}


def _check_type(qtype):
    """(type, block elements, block bytes) of a qtype not in _TYPE_INFO, or the ValueError naming it."""
    try:
        qt = T(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML type {qtype!r}") from None
    if qt not in SUPPORTED:
        raise ValueError(f"GGML type {qt.name} is not supported by the numba backend "
                         f"(supported: {', '.join(sorted(t.name for t in SUPPORTED))})")
    return (qt, *formats.block_size(qt))


def _check(x, w, qtype, out, threads) -> T:
    info = _TYPE_INFO.get(qtype) if isinstance(qtype, (int, np.integer)) else None
    if info is not None:
        qt, elements, nbytes = info
    else:
        qt, elements, nbytes = _check_type(qtype)
    for name, a, dtype in (("x", x, np.float32), ("w", w, np.uint8), ("out", out, np.float32)):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{name} must be a NumPy array, got {type(a).__name__}")
        if a.dtype != dtype or a.ndim != 2:
            raise ValueError(f"{name} must be a 2-D {np.dtype(dtype).name} array, got {a.dtype}{list(a.shape)}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    n, cols = x.shape
    if cols % elements:
        raise ValueError(f"{qt.name}: x has {cols} columns, not a multiple of the {elements}-element block")
    if w.shape[1] != cols // elements * nbytes:
        raise ValueError(f"{qt.name}: w has {w.shape[1]} bytes per row; {cols} columns need "
                         f"{cols // elements * nbytes}")
    if out.shape != (n, w.shape[0]):
        raise ValueError(f"out must have shape (n, rows) = {(n, w.shape[0])}, got {out.shape}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    # the exact test only where the bounds overlap (it costs a microsecond or two a call)
    if any(np.may_share_memory(out, a) and np.shares_memory(out, a) for a in (x, w)):
        raise ValueError("out must not overlap x or w")
    return qt


# (qtype, simd) -> strategy(): looked up once (a microsecond a call otherwise)
_STRATEGY: dict = {}

# SERIAL: on one thread the int8 tiers' quantizers and kernels run their rows as a plain loop
# (their `threads` argument), not a parallel region (whose launch costs ~5 us even on one
# thread), and Numba's thread count is neither read nor set (~2 and ~3 us from Python): together
# ~20 us of a 768x2048 decode product's ~100. (Setting it inside the compiled kernels would be
# cheaper still, but makes them uncacheable: Numba sees the threading layer as a dynamic global.)


def _run(x, w, qt: T, out, kind: str, threads: int) -> None:
    """Dispatch to the kernel tier `kind` (strategy(); inputs already checked, n, rows, cols > 0;
    threads: Numba's thread count now, as the int8 tiers' kernels and quantizers are told).

    NaN contract (docs/DESIGN.md, kernels): the tiers that quantize x to int8 lose a NaN / Inf, so
    the quantizer flags those rows (`bad`) and their outputs become NaN afterwards, as the float
    reference gives; the float tiers propagate NaN / Inf through their float32 products."""
    bad = np.empty(x.shape[0], np.uint8)  # uint8[n]: activation row holds a NaN / Inf
    nbad = 0                              # how many do (the float tiers: none to mark)
    if qt in _K_QUANTS:
        if kind.endswith("-int8"):
            kernel, pos = _K_SIMD[qt.name]
            qs, d, bsums, nbad = _quantize_q8_k_at(x, pos, bad, threads)
            kernel(qs, d, bsums, w, out, tile_rows(x.shape[1]), threads)
        else:
            qs, d, bsums, nbad = _quantize_q8_k_at(x, _IDENTITY_256, bad, threads)
            kq.GENERIC_KERNELS[qt.name](qs, d, bsums, w, out)
    elif qt in _LEGACY:
        if kind.endswith("-int8"):
            nsplit = lg.split_blocks(qt.name.lower(), x.shape[1] // 32)
            qs, d, qsum, nbad = _quantize_q8_0_counted(x, bad, nsplit, threads)
            lg.SIMD_KERNELS[qt.name](qs, d, qsum, w, out, tile_rows(x.shape[1]), threads)
        else:
            lg.GENERIC_KERNELS[qt.name](x, w, out)
    else:
        lg._dense_kernel(lg.DENSE_KIND[qt.name], x, w, out)
    if nbad:
        out[bad.view(bool)] = np.nan


def matmul_into(x: np.ndarray, w: np.ndarray, qtype, out: np.ndarray, threads: int, *,
                _simd: bool | None = None) -> None:
    """out[n, rows] = x[n, cols] @ W.T, W being `rows` GGUF rows of `qtype` blocks in w.

    x: float32[n, cols], C-contiguous; w: uint8[rows, row_bytes(qtype, cols)], C-contiguous;
    out: float32[n, rows], C-contiguous, overwritten; threads: threads to use (capped at
    NUMBA_NUM_THREADS); the previous Numba thread count is restored afterwards. Raises
    ValueError on any mismatch. (`_simd=False` forces the portable tier, for tests.)
    """
    qt = _check(x, w, qtype, out, threads)
    n, cols = x.shape
    if n == 0 or w.shape[0] == 0:
        return
    if cols == 0:
        out.fill(0)
        return
    simd = HAVE_SIMD if _simd is None else (_simd and HAVE_SIMD)
    kind = _STRATEGY.get((qt, simd)) or _STRATEGY.setdefault((qt, simd), strategy(qt, simd))
    want = min(int(threads), numba.config.NUMBA_NUM_THREADS)
    if want == 1 and kind.endswith("-int8"):
        _run(x, w, qt, out, kind, 1)  # SERIAL: no parallel region, Numba's thread count untouched
        return
    prev = numba.get_num_threads()
    change = want != prev   # usually not: then nothing to set or undo
    if change:
        numba.set_num_threads(want)
    try:
        _run(x, w, qt, out, kind, want)
    finally:
        if change:
            numba.set_num_threads(prev)
