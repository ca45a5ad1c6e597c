"""The NumPy oracle: slow, obviously right, what every kernel is tested against.

blocks.py  dequantize each GGML block type (bit-identical to gguf.quants), matmul_ref, random_raw
ops.py     the small float32 operations (RMSNorm, rope, softmax, SiLU) that kernels/_ops.pyx runs
deltanet.py  Gated DeltaNet (Qwen3.5 / Qwen3-Next): conv1d + SiLU, the gated delta rule (recurrent and
           chunked), gated RMSNorm; what kernels/_deltanet.pyx runs
"""
from .blocks import dequantize, matmul_ref, random_raw

__all__ = ["dequantize", "matmul_ref", "random_raw"]
