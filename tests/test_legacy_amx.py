"""The AMX-INT8 path of the legacy-type matmul (weightstream.kernels._legacy, n >= the AMX cut-off).

References as in tests/test_legacy_cython.py: ``matmul_q8_ref`` (NMSE; for Q4_1 / Q5_1 also the
reference with Q8_1's fp16 s, which the kernel uses, at the float-rounding level), a bound on
max |got - ref| relative to max sum |x w|, threads 1 and 2 bit-identical, and the AMX path
against the AVX-512 path of the same build (forced with ``_amx_tuning(min_n=...)``).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import formats, quantize, reference
from weightstream.kernels.quantize import matmul_q8_ref, nmse

_legacy = pytest.importorskip("weightstream.kernels._legacy")

pytestmark = pytest.mark.skipif(
    not getattr(_legacy, "AMX", False),
    reason="no AMX: build without -march=native on an AMX-INT8 CPU, or Linux refused the tile state")

QUANT = [T.Q4_1, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1]
MIN_TYPES = (T.Q4_1, T.Q5_1)
Q8_NMSE = 1e-8        # offset types: exact int dots, float rounding only
MIN_NMSE = 1e-6       # min types vs matmul_q8_ref: Q8_1's fp16 s (see test_legacy_cython.py)
BOUND = 1e-5          # max |got - exact| over max sum |x w|: float rounding only


def _case(qtype, rows, cols, n, seed):
    rng = np.random.default_rng([int(qtype), rows, cols, n, seed])
    return rng.standard_normal((n, cols)).astype(np.float32), reference.random_raw(qtype, rows, cols, rng)


def _run(x, raw, qtype, threads=1):
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)  # NaN: catches unwritten outputs
    _legacy.matmul_into(x, raw, int(qtype), out, threads)
    return out


def _exact_ref(x, raw, qtype, rows, cols):
    """The kernel's math in float64: matmul_q8_ref, except Q4_1 / Q5_1's min term with Q8_1's
    fp16 s (as the kernel and llama.cpp)."""
    if qtype not in MIN_TYPES:
        return matmul_q8_ref(x, raw, qtype, (rows, cols))
    act = quantize.quantize_q8_1(x)
    blocks = np.ascontiguousarray(raw).reshape(-1).view(formats.BLOCK_DTYPES[qtype])
    m = blocks["m"].astype(np.float64).reshape(rows, cols // 32)
    w = reference.dequantize(raw, qtype, (rows, cols)).astype(np.float64)
    xq = act.dequantize().astype(np.float64)
    return (xq @ (w - np.repeat(m, 32, axis=1)).T + act.s.astype(np.float64) @ m.T).astype(np.float32)


@pytest.fixture
def amx_from():
    """Set the AMX cut-off for one test, restoring it after."""
    saved = _legacy._amx_tuning()
    yield lambda n: _legacy._amx_tuning(min_n=n)
    _legacy._amx_tuning(*saved)


def test_flag_and_cut_off():
    assert isinstance(_legacy.AMX, bool)
    min_n, act_l2 = _legacy._amx_tuning()
    assert 5 <= min_n <= 16 and act_l2 > 0


# rows x cols x n: rows off the 16-row tiles (1, 17, 129, 4097), n off the 16-row groups (17, 31),
# odd block counts (1, 17, 45), the demo model's 576 / 1536 and a 14336-column row
SHAPES = [
    (1, 32, 8),
    (17, 576, 16),
    (129, 1536, 17),
    (17, 544, 31),
    (129, 576, 64),
    (33, 1440, 256),
    (4097, 64, 8),
    (17, 14336, 17),
    (3, 4096, 64),
]


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", SHAPES, ids=lambda v: str(v))
def test_matches_q8_reference(qtype, rows, cols, n):
    x, raw = _case(qtype, rows, cols, n, 0)
    got = _run(x, raw, qtype)
    assert np.all(np.isfinite(got))
    assert nmse(got, matmul_q8_ref(x, raw, qtype, (rows, cols))) < (MIN_NMSE if qtype in MIN_TYPES else Q8_NMSE)
    exact = _exact_ref(x, raw, qtype, rows, cols)
    assert nmse(got, exact) < Q8_NMSE
    w = np.abs(reference.dequantize(raw, qtype, (rows, cols)))
    assert np.abs(got - exact).max() / (np.abs(x) @ w.T).max() < BOUND


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", [(129, 576, 31), (4097, 64, 17), (40, 1536, 256)],
                         ids=lambda v: str(v))
def test_threads_give_identical_results(qtype, rows, cols, n):
    x, raw = _case(qtype, rows, cols, n, 1)
    assert np.array_equal(_run(x, raw, qtype, 1).view(np.uint32), _run(x, raw, qtype, 2).view(np.uint32))


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
def test_matches_avx512_path(amx_from, qtype):
    x, raw = _case(qtype, 65, 2048, 40, 2)
    amx_from(1)
    amx = _run(x, raw, qtype)
    amx_from(1 << 30)
    avx = _run(x, raw, qtype)
    assert nmse(amx, avx) < Q8_NMSE


@pytest.mark.parametrize("n", [1, 5, 8, 15])
def test_small_n_either_path(amx_from, n):
    """Below and at the cut-off, and with AMX forced for a single activation row (15 of padding)."""
    x, raw = _case(T.Q4_1, 40, 576, n, 3)
    exact = _exact_ref(x, raw, T.Q4_1, 40, 576)
    for min_n in (1, 16):
        amx_from(min_n)
        assert nmse(_run(x, raw, T.Q4_1), exact) < Q8_NMSE


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_activation_chunks_do_not_change_results(qtype):
    """Packed activations cut into chunks (one 16-row group each, or all at once): same bits."""
    x, raw = _case(qtype, 33, 1024, 80, 4)
    saved = _legacy._amx_tuning()
    try:
        outs = []
        for act_l2 in (1, 1 << 30):
            _legacy._amx_tuning(act_l2=act_l2)
            outs.append(_run(x, raw, qtype))
    finally:
        _legacy._amx_tuning(*saved)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
def test_zero_rows_and_blocks(qtype):
    x, raw = _case(qtype, 20, 512, 20, 5)
    x[1] = 0.0                  # an all-zero row: d = 0
    x[2, :32] = 0.0             # one all-zero block
    got = _run(x, raw, qtype)
    assert np.all(got[1] == 0.0)
    assert nmse(got, _exact_ref(x, raw, qtype, 20, 512)) < Q8_NMSE
