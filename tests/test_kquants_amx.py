"""The AMX-INT8 path of the fused Q2_K matmul (weightstream.kernels._kquants, n >= the AMX cut-off).

Same references as tests/test_kquants_cython.py: ``matmul_q8_ref`` (the kernel's exact math up
to float summation order, NMSE < 1e-8), threads 1 and 2 bit-identical, plus the AMX path against
the AVX-512 path of the same build (forced with ``_amx_tuning(min_n=...)``).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import reference
from weightstream.kernels.quantize import matmul_q8_ref, nmse

_kquants = pytest.importorskip("weightstream.kernels._kquants")

pytestmark = pytest.mark.skipif(
    not getattr(_kquants, "AMX", False),
    reason="no AMX: build without -march=native on an AMX-INT8 CPU, or Linux refused the tile state")

Q8_NMSE = 1e-8
BOUND = 1e-5     # max |got - ref| over max sum |x w|: float rounding only


def _case(rows, cols, n, seed):
    rng = np.random.default_rng([int(T.Q2_K), rows, cols, n, seed])
    return rng.standard_normal((n, cols)).astype(np.float32), reference.random_raw(T.Q2_K, rows, cols, rng)


def _run(x, raw, threads=1):
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)  # NaN: catches unwritten
    _kquants.matmul_into(x, raw, int(T.Q2_K), out, threads)
    return out


@pytest.fixture
def amx_from():
    """Set the AMX cut-off for one test, restoring it after."""
    saved = _kquants._amx_tuning()
    yield lambda n: _kquants._amx_tuning(min_n=n)
    _kquants._amx_tuning(*saved)


def test_flag_and_cut_off():
    assert isinstance(_kquants.AMX, bool)
    min_n, act_l2 = _kquants._amx_tuning()
    assert 1 <= min_n <= 16 and act_l2 > 0


# rows x cols x n: row counts off the 16-row tiles (1, 17, 129, 4097), n off the 16-row groups
# (17, 31), cols from one block to 14336, where a test run can afford it
SHAPES = [
    (1, 256, 16),
    (17, 256, 17),
    (129, 256, 31),
    (17, 4096, 64),
    (129, 4096, 17),
    (33, 14336, 16),
    (17, 1024, 512),
    (4097, 256, 16),
]


@pytest.mark.parametrize("rows,cols,n", SHAPES, ids=lambda v: str(v))
def test_matches_q8_reference(rows, cols, n):
    x, raw = _case(rows, cols, n, 0)
    got = _run(x, raw)
    ref = matmul_q8_ref(x, raw, T.Q2_K, (rows, cols))
    assert np.all(np.isfinite(got))
    assert nmse(got, ref) < Q8_NMSE
    w = np.abs(reference.dequantize(raw, T.Q2_K, (rows, cols)))
    assert np.abs(got - ref).max() / (np.abs(x) @ w.T).max() < BOUND


@pytest.mark.parametrize("rows,cols,n", [(129, 4096, 31), (4097, 256, 17), (17, 1024, 512)],
                         ids=lambda v: str(v))
def test_threads_give_identical_results(rows, cols, n):
    x, raw = _case(rows, cols, n, 1)
    assert np.array_equal(_run(x, raw, 1).view(np.uint32), _run(x, raw, 2).view(np.uint32))


def test_matches_avx512_path(amx_from):
    x, raw = _case(65, 2048, 40, 2)
    amx_from(1)
    amx = _run(x, raw)
    amx_from(1 << 30)
    avx = _run(x, raw)
    assert nmse(amx, avx) < Q8_NMSE


@pytest.mark.parametrize("n", [1, 8, 15])
def test_small_n_either_path(amx_from, n):
    """Below and at the cut-off, and with AMX forced for a single activation row (15 of padding)."""
    x, raw = _case(40, 768, n, 3)
    ref = matmul_q8_ref(x, raw, T.Q2_K, (40, 768))
    for min_n in (1, 16):
        amx_from(min_n)
        assert nmse(_run(x, raw), ref) < Q8_NMSE


def test_activation_chunks_do_not_change_results():
    """Packed activations cut into chunks (one 16-row group each, two groups and a rest of one,
    or all at once; 1 to 3 threads): same bits, through matmul_into and through matmul_many_into
    with tasks of several chunks beside one-chunk tasks."""
    x, raw = _case(33, 1024, 80, 4)
    rng = np.random.default_rng(11)
    xs = [x, x[:8], rng.standard_normal((40, 1024)).astype(np.float32)]
    ws = [raw, raw, reference.random_raw(T.Q2_K, 33, 1024, rng)]
    saved = _kquants._amx_tuning()
    try:
        outs, many = [], []
        for act_l2 in (1, 2 * 4 * (4096 + 512 + 64), 1 << 30):   # per chunk: 1, 2 groups of 4 blocks, all
            _kquants._amx_tuning(act_l2=act_l2)
            for threads in (1, 2, 3):
                outs.append(_run(x, raw, threads))
                got = [np.full((len(xi), 33), np.nan, np.float32) for xi in xs]
                _kquants.matmul_many_into(xs, ws, int(T.Q2_K), got, threads)
                many.append(got)
    finally:
        _kquants._amx_tuning(*saved)
    for out, got in zip(outs, many):
        assert np.array_equal(out, outs[0])
        assert np.array_equal(got[0], outs[0]) and np.array_equal(got[1], outs[0][:8])
        assert np.array_equal(got[2], many[0][2])


def test_zero_rows_and_blocks():
    x, raw = _case(20, 512, 20, 5)
    x[1] = 0.0                  # an all-zero row: Q8_K d = 0
    x[2, :256] = 0.0            # one all-zero block
    got = _run(x, raw)
    assert np.all(got[1] == 0.0)
    assert nmse(got, matmul_q8_ref(x, raw, T.Q2_K, (20, 512))) < Q8_NMSE
