"""Weight quantizers: float32 matrices -> GGUF blocks, as llama.cpp's ``ggml-quants.c`` makes them.

``quantize(w, qtype, imatrix=None)`` returns ``uint8[rows, bytes_per_row]``: the blocks of
``kernels/formats.py`` laid out exactly as llama.cpp writes them, so ``gguf.quants.dequantize``
and ``weightstream.kernels.reference.dequantize`` read them. The cores are in ``kernels/numba/quantize.py``.

Algorithms (per sub-block scale and min chosen by an error-minimising search, not min/max):

* k-quants without imatrix: ``quantize_row_q{2,3,4,5,6}_K_ref``; with an imatrix:
  ``quantize_row_q{2,3,4,5,6}_K_impl`` (per-weight weight ``imatrix[j] * sqrt(sigma2 + x_j^2)``,
  sigma2 = mean x^2 of the super-block, doubled for Q3_K..Q5_K; Q6_K uses ``imatrix[j]`` alone).
* Q4_0 / Q4_1 / Q5_0 / Q5_1: ``quantize_row_q*_impl`` (sigma2 over the whole row). Without an
  imatrix ggml rounds by min/max; here the same search runs with unit importance instead, and
  the levels of all legacy types are re-rounded against the stored fp16 scale (lower error,
  same format).
* Q8_0: ggml has only min/max rounding (it ignores an imatrix); here make_qx_quants' search over
  the symmetric levels -127..127, weighted as the other legacy types.

Bit-exactness with llama.cpp's bytes is not a goal (float summation order differs); what holds:
the bytes decode (with gguf or weightstream.kernels.reference, identically) to values whose error is below
plain min/max rounding of the same format (tests/test_quantize_weights.py).
``bench_quantize()`` measures weights per second on one core.
"""
from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType

from . import formats
from .numba import quantize as nq
from .traits import TRAITS

__all__ = ["quantize", "SUPPORTED", "bench_quantize"]

T = GGMLQuantizationType

# the types kernels/traits.py gives a quantizer core
SUPPORTED: tuple[GGMLQuantizationType, ...] = tuple(q for q, t in TRAITS.items() if t.quantizer)

_MAX_ABS = 1e18  # far above what fp16 scales hold (65504 per level); keeps x^2 finite

# legacy type -> (nmax of the search, has a min)
_LEGACY = {T.Q4_0: (8, False), T.Q4_1: (15, True), T.Q5_0: (16, False), T.Q5_1: (31, True),
           T.Q8_0: (127, False)}


def _check(w, qtype, imatrix):
    try:
        qt = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML type {qtype!r}") from None
    if qt not in SUPPORTED:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"quantize: GGML type {qt.name} is not supported (supported: {names})")
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2:
        desc = f"{w.dtype}{list(w.shape)}" if isinstance(w, np.ndarray) else type(w).__name__
        raise ValueError(f"quantize: w must be a float32[rows, cols] array, got {desc}")
    rows, cols = w.shape
    block = formats.block_size(qt)[0]
    if cols % block:
        raise ValueError(
            f"quantize: {qt.name} needs rows of whole {block}-element blocks; "
            f"w of shape {w.shape} has {cols} columns"
        )
    if not np.isfinite(w).all():
        raise ValueError(f"quantize: w of shape {w.shape} holds NaN or infinite values")
    if w.size and np.abs(w).max() > _MAX_ABS:  # x^2 would overflow float32 in the searches
        raise ValueError(f"quantize: |w| up to {np.abs(w).max():g} would overflow fp16 scales")
    if imatrix is not None:
        if not isinstance(imatrix, np.ndarray) or imatrix.dtype != np.float32 or imatrix.shape != (cols,):
            desc = (f"{imatrix.dtype}{list(imatrix.shape)}" if isinstance(imatrix, np.ndarray)
                    else type(imatrix).__name__)
            raise ValueError(f"quantize: imatrix must be float32[{cols}] (one value per column of w), got {desc}")
        if not (np.isfinite(imatrix).all() and (imatrix >= 0).all()):
            raise ValueError("quantize: imatrix must be finite and >= 0 (a mean of squared activations)")
        imatrix = np.ascontiguousarray(imatrix)
    return qt, np.ascontiguousarray(w), imatrix


def quantize(w: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """w: float32[rows, cols] (cols a multiple of the type's block size, else ValueError naming the shape and block);
    imatrix: float32[cols] per-column importance (mean of x^2 of the activations this weight multiplies) or None.
    Returns uint8[rows, bytes_per_row]: GGUF blocks exactly as llama.cpp lays them out, readable by gguf.quants.dequantize."""
    qt, w, imatrix = _check(w, qtype, imatrix)
    rows, cols = w.shape
    elements = formats.block_size(qt)[0]
    blocks = np.zeros(rows * cols // elements, dtype=formats.BLOCK_DTYPES[qt])
    if blocks.size:
        if qt in _LEGACY:
            _legacy(w, qt, imatrix, blocks)
        else:
            _k_quant(w.reshape(-1, formats.QK_K), qt, imatrix, cols, blocks)
        for name in ("d", "dmin", "m"):
            if name in blocks.dtype.names and not np.isfinite(blocks[name]).all():
                raise ValueError(
                    f"quantize: {qt.name} scales of w {w.shape} overflow fp16 (|w| up to {np.abs(w).max():g})"
                )
    return blocks.view(np.uint8).reshape(rows, formats.row_bytes(qt, cols))


def _k_quant(x, qt, imatrix, cols, blocks):
    """x: float32[n_blocks, 256]; fills blocks (BLOCK_Q*_K[n_blocks]) in place."""
    nb = len(x)
    use_qw = imatrix is not None
    qw = imatrix.reshape(cols // formats.QK_K, formats.QK_K) if use_qw else np.zeros((1, formats.QK_K), np.float32)
    d = np.empty(nb, np.float32)
    dmin = np.empty(nb, np.float32)
    if qt == T.Q2_K:
        nq.q2_k(x, qw, use_qw, blocks["scales"], blocks["qs"], d, dmin)
    elif qt == T.Q3_K:
        nq.q3_k(x, qw, use_qw, blocks["hmask"], blocks["qs"], blocks["scales"], d)
    elif qt == T.Q4_K:
        nq.q45_k(x, qw, use_qw, 15, blocks["scales"], blocks["qs"], np.empty((1, 32), np.uint8), d, dmin)
    elif qt == T.Q5_K:
        nq.q45_k(x, qw, use_qw, 31, blocks["scales"], blocks["qs"], blocks["qh"], d, dmin)
    else:
        nq.q6_k(x, qw, use_qw, blocks["ql"], blocks["qh"], blocks["scales"], d)
    # d and dmin are already binary16 values: astype is exact
    blocks["d"] = d.astype(np.float16)
    if "dmin" in blocks.dtype.names:
        blocks["dmin"] = dmin.astype(np.float16)


def _legacy(w, qt, imatrix, blocks):
    """w: float32[rows, cols]; fills blocks (BLOCK_Q4_0 & co.[rows * cols // 32]) in place."""
    nmax, has_min = _LEGACY[qt]
    use_qw = imatrix is not None
    qw = imatrix if use_qw else np.zeros(w.shape[1], np.float32)
    nb = len(blocks)
    d = np.empty(nb, np.float32)
    m = np.empty(nb if has_min else 1, np.float32)
    qh = blocks["qh"] if "qh" in blocks.dtype.names else np.empty((1, 4), np.uint8)
    nq.legacy(w, qw, use_qw, nmax, has_min, blocks["qs"], qh, d, m)
    blocks["d"] = d.astype(np.float16)
    if has_min:
        blocks["m"] = m.astype(np.float16)


def bench_quantize(rows: int = 1024, cols: int = 4096, types=(T.Q2_K, T.Q4_K), imatrix: bool = False,
                   repeat: int = 3, seed: int = 0) -> dict[str, float]:
    """Million weights per second of quantize() (best of ``repeat``, after a warm-up call), on
    Gaussian data. Numba here is single-threaded: this is one core's figure."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    qw = rng.lognormal(0, 1, cols).astype(np.float32) if imatrix else None
    result = {}
    for qt in types:
        qt = GGMLQuantizationType(qt)
        quantize(w[:1, :formats.block_size(qt)[0]], qt, None if qw is None else qw[:formats.block_size(qt)[0]])
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            quantize(w, qt, qw)
            best = min(best, time.perf_counter() - t0)
        result[qt.name] = w.size / best / 1e6
    return result


if __name__ == "__main__":  # python -m weightstream.kernels.quantize_weights [--imatrix]
    import sys

    for k, v in bench_quantize(types=SUPPORTED, imatrix="--imatrix" in sys.argv).items():
        print(f"{k:5s} {v:8.1f} M weights/s")
