"""The one table of facts about each supported GGML type; every other Python-side type set derives from it.

A row says how big a block is, what the fused kernels quantize the activations to, which reference
dequantizer (``kernels/reference/blocks.py``) decodes it, which weight quantizer core
(``kernels/numba/quantize.py``) encodes it, and which backends multiply it. The C side has the
same numbers in ``kernels/csrc/common.h``; ``tests/test_kernels_api.py`` checks that the two agree
and ``kernels/formats.py`` checks the byte sizes against its block dtypes and ``gguf``.

This module imports only ``gguf`` so that formats, reference and the backends can all import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

__all__ = ["TypeTraits", "TRAITS", "FLOAT", "LEGACY", "K_QUANT", "of", "types_in", "types_on"]

# Families: the block shape decides which kernel module handles a type.
FLOAT = "float"      # F32 / F16 / BF16: a "block" of one element, multiplied in float32
LEGACY = "legacy"    # 32-element blocks with one fp16 scale (and min)
K_QUANT = "k-quant"  # 256-element super-blocks with sub-block scales

# Every backend multiplies every type today; a type some backend lacks names fewer here.
ALL_BACKENDS = frozenset({"cython", "numba", "numpy"})


@dataclass(frozen=True)
class TypeTraits:
    qtype: T
    family: str                 # FLOAT, LEGACY or K_QUANT
    block_elements: int         # values per block (1 for the float types)
    block_bytes: int            # bytes per block (ggml-common.h's sizeof(block_*))
    activation: T | None        # llama.cpp's vec_dot_type: what the integer kernels quantize x to
                                # (None: float32 activations). Numba's portable tier multiplies the
                                # legacy types by float32 activations instead.
    dequantizer: str            # name of the reference/blocks.py function that decodes a block array
    quantizer: str | None       # name of the numba/quantize.py core that encodes it (None: none)
    backends: frozenset[str] = ALL_BACKENDS


TRAITS: dict[T, TypeTraits] = {t.qtype: t for t in (
    #          qtype   family   elems bytes activation dequantizer        quantizer
    TypeTraits(T.F32,  FLOAT,   1,    4,    None,      "dequantize_f32",  None),
    TypeTraits(T.F16,  FLOAT,   1,    2,    None,      "dequantize_f16",  None),
    TypeTraits(T.BF16, FLOAT,   1,    2,    None,      "dequantize_bf16", None),
    TypeTraits(T.Q8_0, LEGACY,  32,   34,   T.Q8_0,    "dequantize_q8_0", "legacy"),
    TypeTraits(T.Q4_0, LEGACY,  32,   18,   T.Q8_0,    "dequantize_q4_0", "legacy"),
    TypeTraits(T.Q4_1, LEGACY,  32,   20,   T.Q8_1,    "dequantize_q4_1", "legacy"),  # Q8_1: s for the min
    TypeTraits(T.Q5_0, LEGACY,  32,   22,   T.Q8_0,    "dequantize_q5_0", "legacy"),
    TypeTraits(T.Q5_1, LEGACY,  32,   24,   T.Q8_1,    "dequantize_q5_1", "legacy"),
    TypeTraits(T.Q2_K, K_QUANT, 256,  84,   T.Q8_K,    "dequantize_q2_k", "q2_k"),
    TypeTraits(T.Q3_K, K_QUANT, 256,  110,  T.Q8_K,    "dequantize_q3_k", "q3_k"),
    TypeTraits(T.Q4_K, K_QUANT, 256,  144,  T.Q8_K,    "dequantize_q4_k", "q45_k"),
    TypeTraits(T.Q5_K, K_QUANT, 256,  176,  T.Q8_K,    "dequantize_q5_k", "q45_k"),
    TypeTraits(T.Q6_K, K_QUANT, 256,  210,  T.Q8_K,    "dequantize_q6_k", "q6_k"),
)}


def of(qtype: T | int) -> TypeTraits:
    """The row of a supported type (KeyError for any other)."""
    return TRAITS[T(qtype)]


def types_in(*families: str) -> tuple[T, ...]:
    """Supported types of the given families, in table order."""
    return tuple(q for q, t in TRAITS.items() if t.family in families)


def types_on(backend: str, *families: str) -> frozenset[T]:
    """Types `backend` multiplies (restricted to `families` if any are named)."""
    return frozenset(q for q, t in TRAITS.items()
                     if backend in t.backends and (not families or t.family in families))
