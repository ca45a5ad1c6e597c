"""NumPy quantizers for activations, as llama.cpp quantizes them before an integer dot product.

The fused kernels may multiply quantized weights by int8-quantized activations (llama.cpp's
`vec_dot_type`): Q8_K for the k-quants (Q2_K..Q6_K), Q8_0 for Q4_0 / Q5_0 / Q8_0, Q8_1 for
Q4_1 / Q5_1. These functions are the reference for that step (bit-exact with ggml-quants.c's
`quantize_row_q8_K_ref` / `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref`), returned as separate
arrays rather than packed blocks so kernels and tests can use them directly.

`activation_type(qtype)` says which one a weight type pairs with, and `matmul_q8_ref` is the
reference result of a kernel that quantizes its activations: dequantized weights times the
dequantized (rounded) activations, in float64 then cast, so the only error left between it and a
correct integer kernel is float summation order.
(Weight quantizers, float32 matrices -> GGUF blocks, are in kernels/quantize_weights.py.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from . import reference, traits

QK_K = 256
QK8_0 = 32


@dataclass(frozen=True)
class QuantizedActivations:
    """int8 activations with one scale per block (Q8_K: 256 values, Q8_0 / Q8_1: 32).

    qs: int8[n, cols]; d: float32[n, cols // block]; bsums: int16[n, cols // 16] (Q8_K only:
    sums of each 16 quants, used for the k-quants' min terms); s: float32[n, cols // 32]
    (Q8_1 only: d * sum(qs) of the block, used for Q4_1 / Q5_1's min terms).
    """

    qtype: T
    qs: np.ndarray
    d: np.ndarray
    bsums: np.ndarray | None = None
    s: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        n, cols = self.qs.shape
        block = cols // self.d.shape[1]
        return (self.qs.reshape(n, -1, block).astype(np.float32) * self.d[:, :, None]).reshape(n, cols)


def activation_type(qtype: T) -> T | None:
    """The activation quantization llama.cpp pairs with a weight type (None: float activations)."""
    return traits.of(qtype).activation


def _rows(x: np.ndarray, block: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % block:
        raise ValueError(f"activations must be float32[n, cols] with cols a multiple of {block}, got {x.shape}")
    return x


def quantize_q8_k(x: np.ndarray) -> QuantizedActivations:
    """Per 256 values: the value of largest magnitude maps to -127; q = round_half_even(-127/max * x)."""
    x = _rows(x, QK_K)
    n, cols = x.shape
    blocks = x.reshape(n, cols // QK_K, QK_K)
    # the signed value with the largest magnitude (first one on ties, as the C loop's strict '>')
    idx = np.argmax(np.abs(blocks), axis=2)
    vmax = np.take_along_axis(blocks, idx[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax == 0, np.float32(0), np.float32(-127.0) / vmax).astype(np.float32)
    q = np.rint(iscale[:, :, None] * blocks)  # nearest_int: round half to even
    qs = np.minimum(q, 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(vmax == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    bsums = qs.reshape(n, cols // 16, 16).sum(axis=2, dtype=np.int32).astype(np.int16)
    return QuantizedActivations(T.Q8_K, qs.reshape(n, cols), d, bsums=bsums)


def _q8_0_blocks(x: np.ndarray):
    n, cols = x.shape
    blocks = x.reshape(n, cols // QK8_0, QK8_0)
    d = np.abs(blocks).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    scaled = blocks * inv[:, :, None]
    qs = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)  # roundf: half away from 0
    return qs, d


def quantize_q8_0(x: np.ndarray) -> QuantizedActivations:
    """Per 32 values: d = max|x| / 127 (stored as fp16), q = roundf(x / d)."""
    x = _rows(x, QK8_0)
    qs, d = _q8_0_blocks(x)
    return QuantizedActivations(T.Q8_0, qs.reshape(x.shape), d.astype(np.float16).astype(np.float32))


def quantize_q8_1(x: np.ndarray) -> QuantizedActivations:
    """Q8_0's quants plus s = d * sum(q) per block (both stored as fp16)."""
    x = _rows(x, QK8_0)
    qs, d = _q8_0_blocks(x)
    s = d * qs.sum(axis=2, dtype=np.int32).astype(np.float32)
    return QuantizedActivations(T.Q8_1, qs.reshape(x.shape), d.astype(np.float16).astype(np.float32),
                                s=s.astype(np.float16).astype(np.float32))


QUANTIZERS = {T.Q8_K: quantize_q8_k, T.Q8_0: quantize_q8_0, T.Q8_1: quantize_q8_1}


def quantize_activations(x: np.ndarray, weight_type: T) -> QuantizedActivations | None:
    act = activation_type(weight_type)
    return QUANTIZERS[act](x) if act is not None else None


def matmul_q8_ref(x: np.ndarray, raw: np.ndarray, qtype: T, shape) -> np.ndarray:
    """Reference for a kernel that quantizes x first: dequant(W) @ dequant(quantize(x)).T.

    Q4_1 / Q5_1 kernels that use Q8_1's fp16 `s` for the min term are off from this by that
    rounding; their tests allow for it."""
    act = quantize_activations(x, qtype)
    xq = act.dequantize() if act is not None else np.asarray(x, np.float32)
    w = reference.dequantize(raw, qtype, shape).astype(np.float64)
    return (xq.astype(np.float64) @ w.T).astype(np.float32)


def nmse(result: np.ndarray, expected: np.ndarray) -> float:
    """Normalized mean squared error, mse(result, expected) / mse(expected, 0), as llama.cpp's
    test-backend-ops measures kernel error."""
    expected = np.asarray(expected, np.float64)
    denom = float(np.mean(expected ** 2))
    return float(np.mean((np.asarray(result, np.float64) - expected) ** 2) / denom) if denom else 0.0
