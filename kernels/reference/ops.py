"""NumPy versions of the small float32 operations (norms, rope, softmax, activations): the reference
that kernels/_ops.pyx is tested against, and what the engine's prefill attention uses (softmax, Rope tables)."""
from __future__ import annotations

import numpy as np

ROPE_NORM = "norm"  # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (x[2i], x[2i+1])
ROPE_NEOX = "neox"  # llama.cpp LLAMA_ROPE_TYPE_NEOX: rotate halves (x[i], x[i + n_rot/2])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * weight / sqrt(mean(x^2) + eps) over the last axis (llama.cpp rms_norm then mul)."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


class Rope:
    """Rotary position embedding with precomputed cos/sin tables for positions [0, n_ctx).

    style ROPE_NORM rotates adjacent pairs (x[2i], x[2i+1]) (llama.cpp's `llama`, whose converter
    permutes Q/K rows for it); ROPE_NEOX rotates (x[i], x[i + n_rot/2]). Only the first n_rot
    dimensions of each head rotate. freq_factors (llama3-style rope_freqs) divide the frequencies.
    """

    def __init__(self, n_rot: int, base: float, n_ctx: int, style: str, freq_scale: float = 1.0,
                 freq_factors: np.ndarray | None = None):
        if style not in (ROPE_NORM, ROPE_NEOX):
            raise ValueError(f"unknown rope style {style!r}")
        self.n_rot, self.style = n_rot, style
        inv_freq = 1.0 / (base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot))  # [n_rot/2]
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.astype(np.float64)
        pos = np.arange(n_ctx, dtype=np.float64) * freq_scale
        angles = np.outer(pos, inv_freq)  # [n_ctx, n_rot/2]
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: float32[n, n_heads, head_dim], positions: int[n] -> rotated copy."""
        cos = self.cos[positions][:, None, :]  # [n, 1, n_rot/2]
        sin = self.sin[positions][:, None, :]
        out = x.copy()
        r = self.n_rot
        if self.style == ROPE_NORM:
            a, b = x[..., 0:r:2], x[..., 1:r:2]
            out[..., 0:r:2] = a * cos - b * sin
            out[..., 1:r:2] = a * sin + b * cos
        else:
            half = r // 2
            a, b = x[..., :half], x[..., half:r]
            out[..., :half] = a * cos - b * sin
            out[..., half:r] = a * sin + b * cos
        return out
