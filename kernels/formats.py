"""GGUF / ggml block layouts as NumPy structured dtypes.

One dtype per block type, field for field as llama.cpp declares them in
``ggml/src/ggml-common.h`` (``block_q4_0``, ``block_q2_K``, ...). A raw tensor row
of ``row_bytes(qtype, cols)`` bytes, viewed as ``BLOCK_DTYPES[qtype]``, is an array of
``cols // elements_per_block`` blocks whose fields can be read by name.

Conventions:

* All multi-byte fields are little-endian (``<f2``, ``<u2``), as GGUF files are.
* ``ggml_half`` (IEEE binary16) fields are ``<f2``.
* Dtypes are packed (no alignment padding), as the C structs are: every field is
  either bytes or a 16-bit value at an even offset, so the C compiler adds no padding
  either. Each dtype has a size assert written like ggml-common.h's ``static_assert``
  and is cross-checked against ``gguf.GGML_QUANT_SIZES``.
* The dense types (F32, F16, BF16) are "blocks" of one element, as in ggml.

Which types are supported, and their block sizes, come from ``kernels/traits.py``; this module
adds the field layout of each.

``gguf.GGMLQuantizationType`` is the type enum everywhere; functions here also accept
its plain integer values.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .traits import TRAITS

__all__ = [
    "QK_K",
    "K_SCALE_SIZE",
    "QK4_0",
    "QK4_1",
    "QK5_0",
    "QK5_1",
    "QK8_0",
    "BLOCK_F32",
    "BLOCK_F16",
    "BLOCK_BF16",
    "BLOCK_Q8_0",
    "BLOCK_Q4_0",
    "BLOCK_Q4_1",
    "BLOCK_Q5_0",
    "BLOCK_Q5_1",
    "BLOCK_Q2_K",
    "BLOCK_Q3_K",
    "BLOCK_Q4_K",
    "BLOCK_Q5_K",
    "BLOCK_Q6_K",
    "BLOCK_DTYPES",
    "SUPPORTED_TYPES",
    "block_size",
    "row_bytes",
    "as_qtype",
]

T = GGMLQuantizationType

# QK = number of values after dequantization; QK_K = super-block size of the k-quants.
QK_K = 256
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K
QK4_0 = 32
QK4_1 = 32
QK5_0 = 32
QK5_1 = 32
QK8_0 = 32

HALF = 2  # sizeof(ggml_half)

# ---------------------------------------------------------------------------
# Dense types: one element per "block".
# ---------------------------------------------------------------------------

BLOCK_F32 = np.dtype([
    ("value", "<f4"),  # IEEE binary32
])
assert BLOCK_F32.itemsize == 4

BLOCK_F16 = np.dtype([
    ("value", "<f2"),  # IEEE binary16 (ggml_half)
])
assert BLOCK_F16.itemsize == HALF

BLOCK_BF16 = np.dtype([
    ("bits", "<u2"),  # bfloat16: the upper 16 bits of a binary32 (NumPy has no bf16)
])
assert BLOCK_BF16.itemsize == 2

# ---------------------------------------------------------------------------
# Legacy 32-element blocks.
# ---------------------------------------------------------------------------

# x = d * q, q = nibble - 8
BLOCK_Q4_0 = np.dtype([
    ("d", "<f2"),                  # delta
    ("qs", "u1", (QK4_0 // 2,)),   # nibbles / quants: low nibbles are elements 0..15, high 16..31
])
assert BLOCK_Q4_0.itemsize == HALF + QK4_0 // 2

# x = d * q + m, q = nibble
BLOCK_Q4_1 = np.dtype([
    ("d", "<f2"),                  # delta
    ("m", "<f2"),                  # min
    ("qs", "u1", (QK4_1 // 2,)),   # nibbles / quants: low nibbles are elements 0..15, high 16..31
])
assert BLOCK_Q4_1.itemsize == 2 * HALF + QK4_1 // 2

# x = d * q, q = (nibble | fifth bit << 4) - 16
BLOCK_Q5_0 = np.dtype([
    ("d", "<f2"),                  # delta
    ("qh", "u1", (4,)),            # 5-th bit of quants: a little-endian uint32, bit j for element j
    ("qs", "u1", (QK5_0 // 2,)),   # nibbles / quants: low nibbles are elements 0..15, high 16..31
])
assert BLOCK_Q5_0.itemsize == HALF + 4 + QK5_0 // 2  # sizeof(uint32_t) + ...

# x = d * q + m, q = nibble | fifth bit << 4
BLOCK_Q5_1 = np.dtype([
    ("d", "<f2"),                  # delta
    ("m", "<f2"),                  # min
    ("qh", "u1", (4,)),            # 5-th bit of quants: a little-endian uint32, bit j for element j
    ("qs", "u1", (QK5_1 // 2,)),   # nibbles / quants: low nibbles are elements 0..15, high 16..31
])
assert BLOCK_Q5_1.itemsize == 2 * HALF + 4 + QK5_1 // 2

# x = d * q
BLOCK_Q8_0 = np.dtype([
    ("d", "<f2"),                  # delta
    ("qs", "i1", (QK8_0,)),        # quants
])
assert BLOCK_Q8_0.itemsize == HALF + QK8_0

# ---------------------------------------------------------------------------
# k-quants: 256-element super-blocks.
# ---------------------------------------------------------------------------

# 2-bit quantization; x = a * q + b; 16 blocks of 16 elements; 2.625 bits per weight.
# scales[i]: low nibble = scale of sub-block i, high nibble = its min.
BLOCK_Q2_K = np.dtype([
    ("scales", "u1", (QK_K // 16,)),  # scales and mins, quantized with 4 bits
    ("qs", "u1", (QK_K // 4,)),       # quants, 2 bits each
    ("d", "<f2"),                     # super-block scale for quantized scales
    ("dmin", "<f2"),                  # super-block scale for quantized mins
])
assert BLOCK_Q2_K.itemsize == 2 * HALF + QK_K // 16 + QK_K // 4

# 3-bit quantization; x = a * q; 16 blocks of 16 elements; 3.4375 bits per weight.
BLOCK_Q3_K = np.dtype([
    ("hmask", "u1", (QK_K // 8,)),    # quants - high bit (bit set means no -4 offset)
    ("qs", "u1", (QK_K // 4,)),       # quants - low 2 bits
    ("scales", "u1", (12,)),          # scales, quantized with 6 bits (16 of them, packed)
    ("d", "<f2"),                     # super-block scale
])
assert BLOCK_Q3_K.itemsize == HALF + QK_K // 4 + QK_K // 8 + 12

# 4-bit quantization; x = a * q + b; 8 blocks of 32 elements; 4.5 bits per weight.
BLOCK_Q4_K = np.dtype([
    ("d", "<f2"),                        # super-block scale for quantized scales
    ("dmin", "<f2"),                     # super-block scale for quantized mins
    ("scales", "u1", (K_SCALE_SIZE,)),   # scales and mins, quantized with 6 bits
    ("qs", "u1", (QK_K // 2,)),          # 4-bit quants
])
assert BLOCK_Q4_K.itemsize == 2 * HALF + K_SCALE_SIZE + QK_K // 2

# 5-bit quantization; x = a * q + b; 8 blocks of 32 elements; 5.5 bits per weight.
BLOCK_Q5_K = np.dtype([
    ("d", "<f2"),                        # super-block scale for quantized scales
    ("dmin", "<f2"),                     # super-block scale for quantized mins
    ("scales", "u1", (K_SCALE_SIZE,)),   # scales and mins, quantized with 6 bits
    ("qh", "u1", (QK_K // 8,)),          # quants, high bit
    ("qs", "u1", (QK_K // 2,)),          # quants, low 4 bits
])
assert BLOCK_Q5_K.itemsize == 2 * HALF + K_SCALE_SIZE + QK_K // 2 + QK_K // 8

# 6-bit quantization; x = a * q; 16 blocks of 16 elements; 6.5625 bits per weight.
BLOCK_Q6_K = np.dtype([
    ("ql", "u1", (QK_K // 2,)),       # quants, lower 4 bits
    ("qh", "u1", (QK_K // 4,)),       # quants, upper 2 bits
    ("scales", "i1", (QK_K // 16,)),  # scales, quantized with 8 bits
    ("d", "<f2"),                     # super-block scale
])
assert BLOCK_Q6_K.itemsize == HALF + QK_K // 16 + 3 * QK_K // 4

# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

BLOCK_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    T.F32: BLOCK_F32,
    T.F16: BLOCK_F16,
    T.BF16: BLOCK_BF16,
    T.Q8_0: BLOCK_Q8_0,
    T.Q4_0: BLOCK_Q4_0,
    T.Q4_1: BLOCK_Q4_1,
    T.Q5_0: BLOCK_Q5_0,
    T.Q5_1: BLOCK_Q5_1,
    T.Q2_K: BLOCK_Q2_K,
    T.Q3_K: BLOCK_Q3_K,
    T.Q4_K: BLOCK_Q4_K,
    T.Q5_K: BLOCK_Q5_K,
    T.Q6_K: BLOCK_Q6_K,
}

# Which types exist and their block sizes come from kernels/traits.py; here each gets its fields.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(TRAITS)
assert set(BLOCK_DTYPES) == SUPPORTED_TYPES

# Cross-check every layout against the traits table and the gguf package (llama.cpp's own table).
for _qtype, _dtype in BLOCK_DTYPES.items():
    assert TRAITS[_qtype].block_bytes == _dtype.itemsize, _qtype.name
    assert GGML_QUANT_SIZES[_qtype] == (TRAITS[_qtype].block_elements, _dtype.itemsize), _qtype.name
del _qtype, _dtype


def as_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    """``qtype`` as a supported ``GGMLQuantizationType``; ValueError otherwise."""
    try:
        qt = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML type {qtype!r}") from None
    if qt not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"GGML type {qt.name} is not supported (supported: {names})")
    return qt


def block_size(qtype: GGMLQuantizationType | int) -> tuple[int, int]:
    """``(elements_per_block, bytes_per_block)`` of ``qtype``, as ``gguf.GGML_QUANT_SIZES``."""
    qt = as_qtype(qtype)
    return TRAITS[qt].block_elements, TRAITS[qt].block_bytes


def row_bytes(qtype: GGMLQuantizationType | int, cols: int) -> int:
    """Bytes of one row of ``cols`` elements of ``qtype``.

    Raises ValueError when ``cols`` is negative or not a multiple of the block size.
    """
    qt = as_qtype(qtype)
    elements, nbytes = block_size(qt)
    cols = int(cols)
    if cols < 0 or cols % elements != 0:
        raise ValueError(
            f"{qt.name}: row of {cols} elements is not a whole number of "
            f"{elements}-element blocks"
        )
    return cols // elements * nbytes
