"""Plain NumPy dequantizers: slow, obviously right, the oracle for every other kernel.

One function per block type, written from the layouts in ``weightstream.kernels.formats`` and
llama.cpp's ``dequantize_row_*`` (``ggml/src/ggml-quants.c``). Each takes a 1-D array of
blocks (a structured array of ``formats.BLOCK_*``) and returns ``float32[n_blocks,
elements_per_block]``, vectorised over blocks.

Bit-exactness. The results equal ``gguf.quants.dequantize`` (and ggml's scalar C) bit for
bit, because every value is computed with the same float32 operations in the same order:

* fp16 scales are widened to float32 exactly; integer quants are converted to float32
  exactly (they are small integers);
* each output is then one of ``q * d``, ``q * d + m``, ``dl * q - ml`` or ``(d * sc) * q``
  with each product and sum rounded to float32 separately, with ``dl = d * sc`` and
  ``ml = dmin * m`` rounded once per sub-block, as ggml does. (Every product that feeds an
  add is exact in float32 (at most 11 + 6 + 5 significant bits), so a compiled kernel whose
  compiler fuses it into an FMA still gets the same bits; see kernels/_dequant.pyx.)

Multiplication and addition are commutative in IEEE arithmetic, so only the grouping of
products and sums matters, not operand order; the grouping is ggml's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from .. import formats
from ..formats import QK_K
from ..traits import TRAITS

__all__ = [
    "dequantize",
    "matmul_ref",
    "random_raw",
    "dequantize_f32",
    "dequantize_f16",
    "dequantize_bf16",
    "dequantize_q8_0",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q5_0",
    "dequantize_q5_1",
    "dequantize_q2_k",
    "dequantize_q3_k",
    "dequantize_q4_k",
    "dequantize_q5_k",
    "dequantize_q6_k",
]

F32 = np.float32


def _half(field: np.ndarray) -> np.ndarray:
    """fp16 field of n blocks -> float32[n, 1] (exact), ready to broadcast over a block."""
    return field.astype(F32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8[n, 16] -> uint8[n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """uint8[n, 4] (a little-endian uint32) -> uint8[n, 32]: bit j of it for element j."""
    bits = qh[:, :, None] >> np.arange(8, dtype=np.uint8)  # [n, byte, bit]
    return (bits & 1).reshape(len(qh), 32)


# ---------------------------------------------------------------------------
# Dense types
# ---------------------------------------------------------------------------


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_F32[n] -> float32[n, 1] (a copy of the bits)."""
    return blocks["value"].astype(F32).reshape(-1, 1)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_F16[n] -> float32[n, 1]: exact widening, NaN payloads kept."""
    return blocks["value"].astype(F32).reshape(-1, 1)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_BF16[n] -> float32[n, 1]: bf16 bits are the top half of the float32 bits."""
    bits = blocks["bits"].astype(np.uint32) << np.uint32(16)
    return bits.view(F32).reshape(-1, 1)


# ---------------------------------------------------------------------------
# Legacy 32-element blocks
# ---------------------------------------------------------------------------


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q8_0[n] -> float32[n, 32]: x = q * d."""
    return blocks["qs"].astype(F32) * _half(blocks["d"])


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q4_0[n] -> float32[n, 32]: x = (nibble - 8) * d."""
    q = _nibbles(blocks["qs"]).astype(np.int8) - np.int8(8)
    return q.astype(F32) * _half(blocks["d"])


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q4_1[n] -> float32[n, 32]: x = nibble * d + m."""
    q = _nibbles(blocks["qs"]).astype(F32)
    return q * _half(blocks["d"]) + _half(blocks["m"])


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q5_0[n] -> float32[n, 32]: x = ((nibble | fifth bit << 4) - 16) * d."""
    q = _nibbles(blocks["qs"]) | (_fifth_bits(blocks["qh"]) << 4)
    q = q.astype(np.int8) - np.int8(16)
    return q.astype(F32) * _half(blocks["d"])


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q5_1[n] -> float32[n, 32]: x = (nibble | fifth bit << 4) * d + m."""
    q = (_nibbles(blocks["qs"]) | (_fifth_bits(blocks["qh"]) << 4)).astype(F32)
    return q * _half(blocks["d"]) + _half(blocks["m"])


# ---------------------------------------------------------------------------
# k-quants
#
# Output element y (0..255) of a super-block sits in sub-block y // 16 (16-element
# sub-blocks: Q2_K, Q3_K, Q6_K) or y // 32 (32-element sub-blocks: Q4_K, Q5_K).
# ---------------------------------------------------------------------------

_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """uint8[n, 64] -> uint8[n, 256] for Q2_K / Q3_K low bits.

    Element y = 128*h + 32*j + l (half h, plane j, lane l) is bits 2j..2j+1 of
    qs[32*h + l]."""
    n = len(qs)
    planes = (qs.reshape(n, 2, 1, 32) >> _SHIFT_2BIT[None, None, :, None]) & 3
    return planes.reshape(n, QK_K)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q2_K[n] -> float32[n, 256]: x = (d * sc) * q - (dmin * m) per 16-element sub-block."""
    n = len(blocks)
    scales = blocks["scales"]                                  # [n, 16]
    dl = _half(blocks["d"]) * (scales & 0x0F).astype(F32)      # [n, 16] rounded once, as ggml
    ml = _half(blocks["dmin"]) * (scales >> 4).astype(F32)     # [n, 16]
    q = _two_bit_planes(blocks["qs"]).astype(F32).reshape(n, 16, 16)
    y = dl[:, :, None] * q - ml[:, :, None]
    return y.reshape(n, QK_K)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """uint8[n, 12] -> int8[n, 16]: the 16 signed 6-bit scales of Q3_K (minus 32).

    Scale k has its low 4 bits in byte k (k < 8) or the high nibble of byte k - 8
    (k >= 8), and its high 2 bits in byte 8 + k % 4 at bit 2 * (k // 4)."""
    n = len(packed)
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)       # [n, 16]
    high = (packed[:, None, 8:12] >> _SHIFT_2BIT[None, :, None]) & 3              # [n, 4, 4]
    sc = low | (high.reshape(n, 16) << 4)
    return sc.astype(np.int8) - np.int8(32)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q3_K[n] -> float32[n, 256]: x = (d * sc) * (q - (high bit ? 0 : 4))."""
    n = len(blocks)
    dl = _half(blocks["d"]) * _q3_k_scales(blocks["scales"]).astype(F32)   # [n, 16]
    low = _two_bit_planes(blocks["qs"]).astype(np.int8)                     # [n, 256]
    # hmask bit 4h + j of byte l marks element 128h + 32j + l: 8 bit planes of 32.
    hbit = (blocks["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = low - ((hbit.reshape(n, QK_K) ^ 1) << 2).astype(np.int8)
    y = dl[:, :, None] * q.astype(F32).reshape(n, 16, 16)
    return y.reshape(n, QK_K)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[n, 12] -> (scales uint8[n, 8], mins uint8[n, 8]), the 6-bit values of Q4_K / Q5_K.

    ggml's get_scale_min_k4: for j < 4, sc = q[j] & 63, m = q[j + 4] & 63; for j >= 4 the low
    4 bits come from byte j + 4 (low nibble: sc, high nibble: m) and the high 2 bits from the
    top bits of byte j - 4 (sc) or byte j (m)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, m


def _four_bit_planes(qs: np.ndarray) -> np.ndarray:
    """uint8[n, 128] -> uint8[n, 256] for Q4_K / Q5_K low bits.

    Element y = 64c + 32h + l is the low (h = 0) or high (h = 1) nibble of qs[32c + l]."""
    n = len(qs)
    planes = (qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]) & 0x0F
    return planes.reshape(n, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q4_K[n] -> float32[n, 256]: x = (d * sc) * q - (dmin * m) per 32-element sub-block."""
    n = len(blocks)
    sc, m = _k4_scales_mins(blocks["scales"])
    d1 = _half(blocks["d"]) * sc.astype(F32)        # [n, 8]
    m1 = _half(blocks["dmin"]) * m.astype(F32)      # [n, 8]
    q = _four_bit_planes(blocks["qs"]).astype(F32).reshape(n, 8, 32)
    y = d1[:, :, None] * q - m1[:, :, None]
    return y.reshape(n, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q5_K[n] -> float32[n, 256]: as Q4_K with q = nibble + (high bit ? 16 : 0)."""
    n = len(blocks)
    sc, m = _k4_scales_mins(blocks["scales"])
    d1 = _half(blocks["d"]) * sc.astype(F32)
    m1 = _half(blocks["dmin"]) * m.astype(F32)
    # qh bit s of byte l is the fifth bit of element 32s + l (s = sub-block).
    hbit = (blocks["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _four_bit_planes(blocks["qs"]) | (hbit.reshape(n, QK_K) << 4)
    y = d1[:, :, None] * q.astype(F32).reshape(n, 8, 32) - m1[:, :, None]
    return y.reshape(n, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """BLOCK_Q6_K[n] -> float32[n, 256]: x = (d * sc) * (q - 32) per 16-element sub-block.

    Element y = 128h + 32k + l (k = 0..3) takes the low (k < 2) or high (k >= 2) nibble of
    ql[64h + 32(k % 2) + l] and bits 2k..2k+1 of qh[32h + l] as its top two bits."""
    n = len(blocks)
    ql = blocks["ql"].reshape(n, 2, 1, 2, 32)                       # [n, h, -, k % 2, l]
    low = (ql >> np.array([0, 4], dtype=np.uint8)[None, None, :, None, None]) & 0x0F
    low = low.reshape(n, 2, 4, 32)                                  # [n, h, k, l]
    high = (blocks["qh"].reshape(n, 2, 1, 32) >> _SHIFT_2BIT[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = _half(blocks["d"]) * blocks["scales"].astype(F32)          # [n, 16]
    y = dl[:, :, None] * q.astype(F32).reshape(n, 16, 16)
    return y.reshape(n, QK_K)


# each type's function, as kernels/traits.py names it
_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    qtype: globals()[traits.dequantizer] for qtype, traits in TRAITS.items()
}
assert set(_DEQUANTIZERS) == formats.SUPPORTED_TYPES


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def _as_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape) -> tuple[np.ndarray, int, int]:
    """Check ``raw`` against ``shape`` and view it as a 1-D array of blocks."""
    raw = np.asarray(raw)
    if shape is None:
        if raw.ndim != 2:
            raise ValueError("shape=(rows, cols) is required unless raw is [rows, bytes_per_row]")
        if raw.dtype != np.uint8:
            raise ValueError("shape=(rows, cols) is required unless raw is uint8")
        elements, nbytes = formats.block_size(qtype)
        if raw.shape[1] % nbytes:
            raise ValueError(
                f"{qtype.name}: {raw.shape[1]} bytes per row is not a whole number of "
                f"{nbytes}-byte blocks"
            )
        shape = (raw.shape[0], raw.shape[1] // nbytes * elements)
    if len(shape) != 2:
        raise ValueError(f"shape must be (rows, cols), got {shape!r}")
    rows, cols = (int(s) for s in shape)
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    expected = rows * formats.row_bytes(qtype, cols)
    # Any dtype is accepted as its bytes (a float32 F32 tensor, a uint8 quantized one).
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != expected:
        raise ValueError(
            f"{qtype.name} {rows}x{cols} needs {expected} bytes, raw has {data.size}"
        )
    return data.view(formats.BLOCK_DTYPES[qtype]), rows, cols


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType | int, shape=None) -> np.ndarray:
    """Dequantize a GGML tensor to ``float32[rows, cols]``.

    ``raw``: the tensor's bytes, ``uint8[rows, bytes_per_row]`` or 1-D (any contiguous array
    is taken as its bytes). ``shape``: ``(rows, cols)`` in elements; it may be left out when
    ``raw`` is 2-D uint8. Bit for bit equal to ``gguf.quants.dequantize``.
    """
    qt = formats.as_qtype(qtype)
    blocks, rows, cols = _as_blocks(raw, qt, shape)
    values = _DEQUANTIZERS[qt](blocks)
    assert values.dtype == np.float32
    return values.reshape(rows, cols)


def matmul_ref(x: np.ndarray, raw: np.ndarray, qtype: GGMLQuantizationType | int, shape=None) -> np.ndarray:
    """The reference product ``x @ W.T`` in float32, with ``W = dequantize(raw, qtype, shape)``.

    ``x``: ``float32[n, cols]`` (or ``[cols]``, giving ``[rows]``). ``W`` is ``[rows, cols]``,
    the GGML / PyTorch ``nn.Linear`` convention (one output per row). Defined as exactly that
    NumPy expression on float32 arrays: kernels that multiply on the blocks accumulate in a
    different order and are compared with it under a named tolerance, not bit for bit.
    """
    w = dequantize(raw, qtype, shape)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.ndim not in (1, 2) or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x of shape {x.shape} does not match a weight of shape {w.shape}")
    return x @ w.T


# ---------------------------------------------------------------------------
# Test inputs
# ---------------------------------------------------------------------------

# (field dtype, exponent mask, top exponent bit) of the float fields random_raw makes finite.
_FLOAT_BITS = {
    np.dtype("<f2"): (np.uint16, 0x7C00, 0x4000),
    np.dtype("<f4"): (np.uint32, 0x7F800000, 0x40000000),
}
_BF16_BITS = (np.uint16, 0x7F80, 0x4000)


def random_raw(
    qtype: GGMLQuantizationType | int,
    rows: int,
    cols: int,
    rng: np.random.Generator,
    *,
    finite: bool = True,
) -> np.ndarray:
    """Seeded random tensor bytes, ``uint8[rows, row_bytes]``, for testing kernels.

    Every byte is random. With ``finite`` (the default), every float field (fp16 scales and
    mins; the values of F16 / BF16 / F32 tensors) is then made finite by clearing the top
    exponent bit where the exponent is all ones, so the bit patterns still cover zeros of
    both signs, subnormals and the largest finite values.
    """
    qt = formats.as_qtype(qtype)
    raw = rng.integers(0, 256, size=(rows, formats.row_bytes(qt, cols)), dtype=np.uint8)
    if finite:
        blocks = raw.reshape(-1).view(formats.BLOCK_DTYPES[qt])
        for name in blocks.dtype.names:
            field_dtype = blocks.dtype.fields[name][0]
            if qt == GGMLQuantizationType.BF16:
                spec = _BF16_BITS
            else:
                spec = _FLOAT_BITS.get(field_dtype)
            if spec is None:
                continue  # integer quants / packed scales: any bits are valid
            uint, exp_mask, top = spec
            bits = blocks[name].view(uint)  # a view into raw
            bits[(bits & exp_mask) == exp_mask] &= uint(~top & np.iinfo(uint).max)
    return raw
