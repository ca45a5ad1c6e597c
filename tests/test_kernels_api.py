"""The public kernel API: QTensor checks, matmul dispatch, and every backend that is built here
against the references (whichever of cython / numba exist on this checkout)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import weightstream.kernels as kernels
from weightstream.kernels import backends, formats, quantize, reference

# Error budgets, as NMSE against the float reference (x @ dequantized W.T). Kernels that quantize
# activations to int8 (llama.cpp's Q8_K / Q8_0 / Q8_1) pay that rounding: ~1e-4 relative power.
NMSE_FLOAT_REF = {"numpy": 1e-12, "fused": 2e-3}
# ... and against the exact computation the kernel does (float activations, or activations rounded
# to int8 as llama.cpp does): summation order only, plus Q8_1's fp16 block sums for Q4_1 / Q5_1.
# As max error over the dot product's bound sum |x_i w_i| (see bounded_error).
BOUND_SAME_MATH = 1e-6
BOUND_SAME_MATH_Q8_1 = 1e-4


FLOAT_DTYPES = {T.F32: np.float32, T.F16: np.float16}


def make(qtype, rows, cols, seed=0):
    """Random valid blocks; for the float types, normal values (random bytes would overflow)."""
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_DTYPES:
        raw = rng.normal(size=(rows, cols)).astype(FLOAT_DTYPES[qtype]).view(np.uint8)
    elif qtype == T.BF16:
        raw = (rng.normal(size=(rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = reference.random_raw(qtype, rows, cols, rng)
    return kernels.QTensor(qtype, (rows, cols), np.ascontiguousarray(raw)), rng


def test_qtensor_checks_its_bytes():
    with pytest.raises(ValueError, match=r"Q2_K tensor of shape \(4, 256\) needs uint8\[4, 84\]"):
        kernels.QTensor(T.Q2_K, (4, 256), np.zeros((4, 80), np.uint8))
    with pytest.raises(ValueError, match="unsupported tensor type IQ2_XXS"):
        kernels.QTensor(T.IQ2_XXS, (4, 256), np.zeros((4, 66), np.uint8))


def test_matmul_checks_inputs():
    qt, _ = make(T.Q4_0, 8, 64)
    with pytest.raises(ValueError, match=r"needs x of shape \(n, 64\)"):
        kernels.matmul(np.zeros((2, 32), np.float32), qt)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        kernels.matmul(np.zeros((2, 64), np.float32), qt, backend="gpu")
    with pytest.raises(ValueError, match="out must be C-contiguous float32"):
        kernels.matmul(np.zeros((2, 64), np.float32), qt, out=np.zeros((2, 9), np.float32))


@pytest.mark.parametrize("qtype", sorted(formats.SUPPORTED_TYPES, key=int))
def test_numpy_backend_is_dequantize_then_matmul(qtype):
    cols = formats.block_size(qtype)[0] * 8 if formats.block_size(qtype)[0] > 1 else 64
    qt, rng = make(qtype, 17, cols)
    x = rng.normal(size=(3, cols)).astype(np.float32)
    out = np.empty((3, 17), np.float32)
    got = kernels.matmul(x, qt, backend="numpy", out=out)
    assert got is out
    assert quantize.nmse(got, reference.matmul_ref(x, qt.data, qtype, qt.shape)) < NMSE_FLOAT_REF["numpy"]


FUSED_CASES = [(b, q) for q in sorted(formats.SUPPORTED_TYPES, key=int) for b in ("cython", "numba")
               if backends.kernel_for(b, q) is not None]


# rows x cols x n: the awkward shapes (rows 1, 3, 17, 129, 4097; cols 256..14336;
# n 1, 2, 7, 64), each value at least once, in combinations a test run can afford
AWKWARD_SHAPES = [(1, 256, 1), (3, 14336, 2), (17, 768, 7), (129, 2560, 64), (4097, 256, 2), (33, 1024, 1)]


def bounded_error(got, ref, x, qt):
    """max |got - ref| over the largest sum_i |x_i w_i| of an output: the rounding bound of a
    dot product, meaningful for a single output that cancels to near zero."""
    w = np.abs(reference.dequantize(qt.data, qt.qtype, qt.shape))
    return np.abs(got - ref).max() / (np.abs(x) @ w.T).max()


@pytest.mark.skipif(not FUSED_CASES, reason="no fused kernels built")
@pytest.mark.parametrize("backend,qtype", FUSED_CASES)
@pytest.mark.parametrize("rows,cols,n", AWKWARD_SHAPES)
def test_fused_backend_against_references(backend, qtype, rows, cols, n):
    qt, rng = make(qtype, rows, cols, seed=int(qtype) + rows)
    x = rng.normal(size=(n, cols)).astype(np.float32)
    got = kernels.matmul(x, qt, threads=2, backend=backend)
    float_ref = reference.matmul_ref(x, qt.data, qtype, qt.shape)
    if got.size >= 64:  # NMSE of a handful of outputs says little
        assert quantize.nmse(got, float_ref) < NMSE_FLOAT_REF["fused"]
    # a kernel keeps float activations or rounds them to int8: it must match one of the two exactly
    same_math = bounded_error(got, float_ref, x, qt)
    if quantize.activation_type(qtype) is not None:
        q8_ref = quantize.matmul_q8_ref(x, qt.data, qtype, qt.shape)
        same_math = min(same_math, bounded_error(got, q8_ref, x, qt))
    assert same_math < (BOUND_SAME_MATH_Q8_1 if qtype in (T.Q4_1, T.Q5_1) else BOUND_SAME_MATH)
    assert np.array_equal(got, kernels.matmul(x, qt, threads=1, backend=backend))  # threads: same bits


def test_auto_picks_an_available_backend():
    for qtype in formats.SUPPORTED_TYPES:
        assert backends.choose(qtype, 1) in backends.available(qtype)


def test_compiled_kernels_are_built():
    """The Cython modules are part of the install (setup.py): their absence is a build failure,
    not a reason to skip the Cython tests."""
    import importlib

    for name in ("weightstream.kernels._dequant", "weightstream.kernels._kquants", "weightstream.kernels._legacy"):
        importlib.import_module(name)
    assert backends.has_fused_kernel(T.Q2_K, "cython") and backends.has_fused_kernel(T.Q4_1, "cython")


def test_traits_table_agrees_with_gguf_and_the_c_header():
    """kernels/traits.py is the one Python table; kernels/csrc/common.h repeats its numbers for C."""
    from gguf import GGML_QUANT_SIZES

    from weightstream.kernels import _dequant, traits
    from weightstream.kernels.numba import quantize as numba_quantize

    assert formats.SUPPORTED_TYPES == set(traits.TRAITS)
    for qtype, row in traits.TRAITS.items():
        assert GGML_QUANT_SIZES[qtype] == (row.block_elements, row.block_bytes), qtype.name
        assert _dequant.BLOCK_SIZES[int(qtype)] == (row.block_elements, row.block_bytes), qtype.name
        assert callable(getattr(reference.blocks, row.dequantizer))
        assert row.quantizer is None or callable(getattr(numba_quantize, row.quantizer))
        assert quantize.activation_type(qtype) == row.activation
