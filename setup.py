"""Builds the Cython kernels of kernels/ with OpenMP.

Native-CPU code generation (-march=native) is on by default because the kernels are
built on the machine that runs them; set WEIGHTSTREAM_PORTABLE=1 for a portable build
(e.g. a wheel for other machines). WEIGHTSTREAM_DEBUG_CYTHON=1 turns bounds checks back on.
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

PORTABLE = os.environ.get("WEIGHTSTREAM_PORTABLE", "0") not in ("", "0")
DEBUG = os.environ.get("WEIGHTSTREAM_DEBUG_CYTHON", "0") not in ("", "0")

# -fno-trapping-math: without it GCC keeps every loop holding a float comparison (ws_expf's
# clamps in SwiGLU, softmax, the sigmoid gate: ops_simd.h) scalar, as a compare might trap; it
# changes no result of an operation, only lets such loops vectorise (SwiGLU of 1536: 10 -> ~1 us)
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
if not PORTABLE:
    compile_args.append("-march=native")
link_args = ["-fopenmp"]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
}


def kernel_extension(name: str) -> Extension:
    """kernels/<name>.pyx as the module weightstream.kernels.<name> (pyproject.toml maps the
    kernels/ folder onto that package; kernels/csrc/ holds the hand-written C headers: common.h
    for every module, the SIMD / AMX kernels of _kquants and _legacy)."""
    return Extension(
        f"weightstream.kernels.{name}",
        [f"kernels/{name}.pyx"],
        include_dirs=[np.get_include(), "kernels/csrc"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


# _dequant: block -> float32 (common.h); _kquants: fused Q2_K..Q6_K matmul (kquants_simd.h,
# kquants_amx.h); _legacy: Q4_0..Q8_0 and floats (legacy.h, legacy_amx.h); _ops: the small
# per-token operations (norm, rope, SwiGLU, one-token attention); _deltanet: Gated DeltaNet's
# conv1d + SiLU, gated delta rule recurrence and gated RMSNorm (Qwen3.5 / Qwen3-Next); _amx:
# k-quant prefill products on AMX-BF16 tiles (amx_bf16.h)
extensions = [kernel_extension(name) for name in ("_dequant", "_kquants", "_legacy", "_ops", "_deltanet", "_amx")]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
