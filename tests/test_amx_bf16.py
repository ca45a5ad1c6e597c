"""The k-quant products on AMX-BF16 tiles (weightstream.kernels._amx, the "amx" backend).

Not the Q8_K path: weights and activations are rounded to bfloat16 and the products summed in
float32, so the reference is the float one (the blocks dequantized by the NumPy reference, times
x in float64), with a bound from bf16's rounding: each product's relative error is at most
~2^-8, so |got - ref| <= 2^-7 * sum |x| |w| row by row, and NMSE < 1e-4 (measured ~5e-6). Bits
do not depend on the thread count or on how the activation rows are chunked.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import backends, reference
from weightstream.kernels.quantize import nmse

_amx = pytest.importorskip("weightstream.kernels._amx")

needs_amx = pytest.mark.skipif(
    not _amx.AVAILABLE, reason="no AMX-BF16: not an AMX CPU, a build without -march=native, or Linux refused the tile state")

K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
BF16_NMSE = 1e-4
BF16_BOUND = 2.0 ** -7


def _case(qtype, rows, cols, n, seed=0):
    rng = np.random.default_rng([int(qtype), rows, cols, n, seed])
    return rng.standard_normal((n, cols)).astype(np.float32), reference.random_raw(qtype, rows, cols, rng)


def _run(x, raw, qtype, threads=1):
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)  # NaN: catches unwritten
    _amx.matmul_into(x, raw, int(qtype), out, threads)
    return out


def _reference(x, raw, qtype, rows, cols):
    w = reference.dequantize(raw, qtype, (rows, cols)).astype(np.float64)
    return x.astype(np.float64) @ w.T, np.abs(x.astype(np.float64)) @ np.abs(w).T


def test_supported_is_every_k_quant_or_nothing():
    assert _amx.SUPPORTED == (frozenset(int(q) for q in K_QUANTS) if _amx.AVAILABLE else frozenset())
    assert backends.REGISTRY["amx"].supports(T.Q4_K) == _amx.AVAILABLE
    assert not backends.REGISTRY["amx"].supports(T.Q8_0)


# rows off the 32-row tasks and 16-row tiles (1, 33, 100), n off the 16-row groups (1, 17, 33),
# one block to several per row
SHAPES = [(1, 256, 1), (33, 256, 17), (100, 768, 33), (64, 2048, 64), (40, 512, 100)]


@needs_amx
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,cols,n", SHAPES)
def test_matches_the_float_reference(qtype, rows, cols, n):
    x, raw = _case(qtype, rows, cols, n)
    got = _run(x, raw, qtype, threads=2)
    ref, scale = _reference(x, raw, qtype, rows, cols)
    assert np.all(np.isfinite(got))
    if rows * n >= 1000:  # (one output can lose digits to cancellation; the bound below holds it)
        assert nmse(got, ref) < BF16_NMSE
    assert np.all(np.abs(got - ref) <= BF16_BOUND * scale + 1e-30)


@needs_amx
@pytest.mark.parametrize("qtype", (T.Q2_K, T.Q4_K, T.Q6_K), ids=lambda q: q.name)
def test_threads_and_chunks_keep_the_bits(qtype):
    x, raw = _case(qtype, 97, 1024, 70)
    base = _run(x, raw, qtype, threads=1)
    saved = _amx._tuning()
    try:
        for threads in (2, 3):
            assert np.array_equal(_run(x, raw, qtype, threads), base)
        _amx._tuning(act_l2=1)  # one pair of 16-row groups a chunk: the weights expanded 3 times
        assert np.array_equal(_run(x, raw, qtype, threads=2), base)
    finally:
        _amx._tuning(saved)


@needs_amx
def test_a_nan_activation_row_stays_in_its_row():
    x, raw = _case(T.Q4_K, 50, 512, 20)
    clean = _run(x, raw, T.Q4_K)
    x[7, 300] = np.nan
    got = _run(x, raw, T.Q4_K)
    assert np.all(np.isnan(got[7]))
    keep = np.arange(20) != 7
    assert np.array_equal(got[keep], clean[keep])


@needs_amx
def test_bad_arguments_name_the_problem():
    x, raw = _case(T.Q4_K, 8, 512, 4)
    out = np.empty((4, 8), np.float32)
    with pytest.raises(ValueError, match="not supported"):
        _amx.matmul_into(x, raw, int(T.Q8_0), out, 1)
    with pytest.raises(ValueError, match="multiple of 256"):
        _amx.matmul_into(np.zeros((4, 500), np.float32), raw, int(T.Q4_K), out, 1)
    with pytest.raises(ValueError, match="bytes per row"):
        _amx.matmul_into(x, raw[:, :-1].copy(), int(T.Q4_K), out, 1)
    with pytest.raises(ValueError, match=r"out must be float32\[4, 8\]"):
        _amx.matmul_into(x, raw, int(T.Q4_K), np.empty((4, 9), np.float32), 1)
    with pytest.raises(ValueError, match="threads"):
        _amx.matmul_into(x, raw, int(T.Q4_K), out, 0)


def test_auto_takes_amx_for_prompts_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(backends, "_measured", lambda: {"Q4_K": {"1": "cython", "512": "amx,numpy"},
                                                         "Q6_K": {"512": "nosuch,amx"}})
    assert backends.choose(T.Q4_K, 1) == "cython"
    assert backends.choose(T.Q4_K, 300) == ("amx" if _amx.AVAILABLE else "numpy")
    assert backends.choose(T.Q6_K, 300) == ("amx" if _amx.AVAILABLE else backends.available(T.Q6_K)[0])
