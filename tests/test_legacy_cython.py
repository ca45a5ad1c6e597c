"""The fused legacy / float matmul (weightstream.kernels._legacy) against the NumPy references.

Tolerances (NMSE, weightstream.kernels.quantize.nmse), measured worst cases over the cases below in brackets:

* Q4_0 / Q5_0 / Q8_0 vs ``matmul_q8_ref`` (same quantized activations, float64 sums): 1e-8
  [Q8_0 4e-13, Q4_0 4e-12, Q5_0 3e-10]. Left over is float32 rounding: per block
  ``(dw * dx) * dot`` and the offset term ``dw * (-offset * dx * sum q)`` that llama.cpp's
  unsigned-times-signed trick needs, summed in float32 across blocks.
* Q4_1 / Q5_1 vs ``matmul_q8_ref``: 1e-6 [1.6e-7]. The min term uses Q8_1's
  ``s = fp16(d * sum q)`` as llama.cpp does: relative error up to 2^-11 on ``m * s`` where the
  reference has ``m * d * sum q`` exactly; with random fp16 mins that term carries most of
  the output, so NMSE ~ (2^-11)^2 / 3 ~ 1e-7. Against a reference that also uses the fp16
  ``s`` (``_q8_1_ref``): 1e-8.
* Float types (F32, F16, BF16) vs ``matmul_ref`` (float32 NumPy / BLAS): 1e-10 [1.4e-12]:
  both sides sum in float32, in different orders.
* Quantized types vs ``matmul_ref`` (float activations): 0.1 on the smallest shapes (one or
  three blocks per row, where a single activation block's rounding can dominate) [0.03],
  2e-3 from 576 columns and 17 rows up [see _ACT_QUANT_NMSE]: this is the activation
  quantization (Q8: step max|x|/127 per 32 values) itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import formats, quantize, reference

_legacy = pytest.importorskip("weightstream.kernels._legacy")

QUANT = [T.Q4_1, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1]
FLOAT = [T.F16, T.BF16, T.F32]
MIN_TYPES = (T.Q4_1, T.Q5_1)

ROWS = (1, 3, 17, 129)
COLS = (32, 96, 576, 1536, 4096)
NS = (1, 2, 7, 64)
_ACT_QUANT_NMSE = 2e-3


def _weights(qtype, rows, cols, rng):
    """random_raw bytes; F32 / BF16 from normal values instead (random bits reach 1e38 and the
    float32 sums overflow). F16 random bits are fine (|w| <= 65504)."""
    if qtype == T.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8).reshape(rows, -1).copy()
    if qtype == T.BF16:
        bits = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(rows, -1).copy()
    return reference.random_raw(qtype, rows, cols, rng)


def _run(x, raw, qtype, threads):
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)  # NaN: catches unwritten outputs
    _legacy.matmul_into(x, raw, int(qtype), out, threads)
    return out


def _q8_1_ref(x, raw, qtype, rows, cols):
    """Q4_1 / Q5_1 reference with Q8_1's fp16 s for the min term, as the kernel (and llama.cpp)."""
    act = quantize.quantize_q8_1(x)
    blocks = np.ascontiguousarray(raw).reshape(-1).view(formats.BLOCK_DTYPES[qtype])
    m = blocks["m"].astype(np.float64).reshape(rows, cols // 32)
    w = reference.dequantize(raw, qtype, (rows, cols)).astype(np.float64)
    w_no_min = w - np.repeat(m, 32, axis=1)            # d * q (exact in float64)
    xq = act.dequantize().astype(np.float64)
    return (xq @ w_no_min.T + act.s.astype(np.float64) @ m.T).astype(np.float32)


def test_supported():
    assert _legacy.SUPPORTED == {int(t) for t in QUANT + FLOAT}


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
def test_activation_quantization_matches_numpy(qtype):
    rng = np.random.default_rng([int(qtype), 1])
    x = rng.standard_normal((5, 4096)).astype(np.float32)
    x[1, :32] = 0                                       # an all-zero block: d = 0
    x[2] *= 1e2                                        # large values (s stays below fp16 max)
    x[3] = np.round(x[3] * 4) / 4                       # many halves: rounding ties
    qs, d, cs = _legacy.quantize_rows(x, int(qtype))
    act = quantize.quantize_activations(x, qtype)
    assert np.array_equal(qs, act.qs)
    assert np.array_equal(d.view(np.uint32), act.d.view(np.uint32))
    if qtype in MIN_TYPES:
        assert np.array_equal(cs.view(np.uint32), act.s.view(np.uint32))
    else:
        off = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 128}[qtype]
        isum = act.qs.reshape(5, -1, 32).sum(axis=2, dtype=np.int64)
        np.testing.assert_array_equal(cs.astype(np.float64), -off * act.d.astype(np.float64) * isum)


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
def test_quantized_types(qtype):
    rng = np.random.default_rng([int(qtype), 2])
    worst_q8 = worst_float = worst_small = 0.0
    cases = [(r, c, n) for r in ROWS for c in COLS for n in NS] + [(r, 14336, n) for r in (3, 17) for n in (1, 7)]
    for rows, cols, n in cases:
        raw = reference.random_raw(qtype, rows, cols, rng)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        got = _run(x, raw, qtype, 1)
        assert np.array_equal(got, _run(x, raw, qtype, 2)), (rows, cols, n)   # bit-identical
        expected = quantize.matmul_q8_ref(x, raw, qtype, (rows, cols))
        worst_q8 = max(worst_q8, quantize.nmse(got, expected))
        if qtype in MIN_TYPES:
            tight = quantize.nmse(got, _q8_1_ref(x, raw, qtype, rows, cols))
            assert tight < 1e-8, (rows, cols, n, tight)
        err = quantize.nmse(got, reference.matmul_ref(x, raw, qtype, (rows, cols)))
        if cols >= 576 and rows >= 17:
            worst_float = max(worst_float, err)
        else:
            worst_small = max(worst_small, err)
    assert worst_q8 < (1e-6 if qtype in MIN_TYPES else 1e-8), worst_q8
    assert worst_float < _ACT_QUANT_NMSE, worst_float
    assert worst_small < 0.1, worst_small


@pytest.mark.parametrize("qtype", FLOAT, ids=lambda t: t.name)
def test_float_types(qtype):
    rng = np.random.default_rng([int(qtype), 3])
    cols_list = COLS + (1, 17, 33, 100)                 # float rows are any length: masked tails
    worst = 0.0
    for rows in ROWS:
        for cols in cols_list:
            for n in NS:
                raw = _weights(qtype, rows, cols, rng)
                x = rng.standard_normal((n, cols)).astype(np.float32)
                got = _run(x, raw, qtype, 1)
                assert np.array_equal(got, _run(x, raw, qtype, 2)), (rows, cols, n)
                worst = max(worst, quantize.nmse(got, reference.matmul_ref(x, raw, qtype, (rows, cols))))
    assert worst < 1e-10, worst


def test_large_head_shape_q8_0():
    """The demo model's tied head shape class (rows >> cols, 18 blocks per row: a partial group)."""
    rng = np.random.default_rng(4)
    raw = reference.random_raw(T.Q8_0, 3000, 576, rng)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    got = _run(x, raw, T.Q8_0, 2)
    assert quantize.nmse(got, quantize.matmul_q8_ref(x, raw, T.Q8_0, (3000, 576))) < 1e-8


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
def test_decode_stream_every_tile_height(qtype):
    """The decode stream (lg_stream_rows: n <= 4, an even number of blocks per row) for every
    activation tile height 1..4, partial 16-row chunks and rows that start inside a 16-block
    scale group (18 blocks a row), against the Q8 reference; the same bits whatever the threads,
    and each activation row's output the same as that row alone (the tile does not mix rows)."""
    rng = np.random.default_rng([int(qtype), 7])
    for rows, cols in [(1, 64), (17, 576), (40, 576), (33, 1536)]:
        raw = reference.random_raw(qtype, rows, cols, rng)
        x = rng.standard_normal((4, cols)).astype(np.float32)
        alone = [_run(x[i:i + 1], raw, qtype, 1) for i in range(4)]
        for n in (1, 2, 3, 4):
            got = _run(x[:n], raw, qtype, 1)
            assert np.array_equal(got, _run(x[:n], raw, qtype, 2)), (rows, cols, n)
            err = quantize.nmse(got, quantize.matmul_q8_ref(x[:n], raw, qtype, (rows, cols)))
            assert err < (1e-6 if qtype in MIN_TYPES else 1e-8), (rows, cols, n, err)
            assert all(np.array_equal(got[i], alone[i][0]) for i in range(n)), (rows, cols, n)


def test_empty_shapes():
    raw = reference.random_raw(T.Q4_1, 0, 64, np.random.default_rng(5))
    out = np.empty((2, 0), np.float32)
    _legacy.matmul_into(np.ones((2, 64), np.float32), raw, int(T.Q4_1), out, 1)
    raw = reference.random_raw(T.Q8_0, 4, 64, np.random.default_rng(5))
    out = np.empty((0, 4), np.float32)
    _legacy.matmul_into(np.ones((0, 64), np.float32), raw, int(T.Q8_0), out, 1)


def test_bad_inputs():
    rng = np.random.default_rng(6)
    raw = reference.random_raw(T.Q4_1, 8, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.empty((2, 8), np.float32)
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        _legacy.matmul_into(x, reference.random_raw(T.Q2_K, 8, 256, rng), int(T.Q2_K), out, 1)
    with pytest.raises(ValueError, match="not supported"):
        _legacy.matmul_into(x, raw, 12345, out, 1)
    with pytest.raises(ValueError, match="columns"):
        _legacy.matmul_into(np.ones((2, 96), np.float32), raw, int(T.Q4_1), out, 1)
    with pytest.raises(ValueError, match="out has shape"):
        _legacy.matmul_into(x, raw, int(T.Q4_1), np.empty((2, 7), np.float32), 1)
    with pytest.raises(ValueError, match="out has shape"):
        _legacy.matmul_into(x, raw, int(T.Q4_1), np.empty((3, 8), np.float32), 1)
    with pytest.raises(ValueError, match="whole 20-byte blocks"):
        _legacy.matmul_into(x, np.ascontiguousarray(raw[:, :30]), int(T.Q4_1), out, 1)
    with pytest.raises(ValueError, match="threads"):
        _legacy.matmul_into(x, raw, int(T.Q4_1), out, 0)
    with pytest.raises(ValueError):                     # float64 activations: buffer dtype mismatch
        _legacy.matmul_into(x.astype(np.float64), raw, int(T.Q4_1), out, 1)
    with pytest.raises(ValueError):                     # non-contiguous activations
        _legacy.matmul_into(np.ones((2, 128), np.float32)[:, ::2], raw, int(T.Q4_1), out, 1)
    with pytest.raises(ValueError):                     # weights must be uint8 bytes
        _legacy.matmul_into(x, raw.view(np.int8), int(T.Q4_1), out, 1)
