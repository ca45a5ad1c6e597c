"""weightstream.kernels.formats and weightstream.kernels.reference against the gguf package (llama.cpp's own Python).

The reference dequantizer must equal ``gguf.quants.dequantize`` bit for bit: float32 results
are compared as uint32 bit patterns, so -0.0 vs 0.0 or a different NaN payload would fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

from weightstream.kernels import formats, reference

ALL_TYPES = sorted(formats.SUPPORTED_TYPES, key=lambda t: t.name)
DENSE_TYPES = {T.F32, T.F16, T.BF16}


def _cols_cases(qtype):
    """One block, and several, in elements."""
    elements = formats.block_size(qtype)[0]
    if elements == 1:
        return [1, 7, 64]
    return [elements, 3 * elements]


def _assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    a_bits, b_bits = a.view(np.uint32), b.view(np.uint32)
    if not np.array_equal(a_bits, b_bits):
        bad = np.argwhere(a_bits != b_bits)
        i = tuple(bad[0])
        raise AssertionError(
            f"{len(bad)} of {a.size} values differ; first at {i}: {a[i]!r} vs {b[i]!r}"
        )


def _gguf(raw: np.ndarray, qtype) -> np.ndarray:
    return np.asarray(gguf_quants.dequantize(raw, qtype), dtype=np.float32)


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------


def test_supported_types_are_the_13():
    names = {t.name for t in formats.SUPPORTED_TYPES}
    assert names == {
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    }
    assert isinstance(formats.SUPPORTED_TYPES, frozenset)
    assert set(formats.BLOCK_DTYPES) == formats.SUPPORTED_TYPES
    assert formats.QK_K == 256


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_block_size_matches_gguf(qtype):
    assert formats.block_size(qtype) == GGML_QUANT_SIZES[qtype]
    assert formats.block_size(int(qtype)) == GGML_QUANT_SIZES[qtype]
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    assert formats.BLOCK_DTYPES[qtype].itemsize == nbytes
    for n_blocks in (0, 1, 5):
        assert formats.row_bytes(qtype, n_blocks * elements) == n_blocks * nbytes


@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if t not in DENSE_TYPES], ids=lambda t: t.name)
def test_row_bytes_rejects_partial_blocks(qtype):
    elements = formats.block_size(qtype)[0]
    for cols in (1, elements - 1, elements + 1, 3 * elements + 16, -elements):
        with pytest.raises(ValueError, match=rf"{qtype.name}.*{cols}"):
            formats.row_bytes(qtype, cols)


def test_unsupported_type_is_rejected():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        formats.block_size(T.IQ2_XXS)
    with pytest.raises(ValueError, match="unknown"):
        formats.row_bytes(12345, 256)


def test_field_offsets_follow_ggml_common_h():
    # A few offsets that kernels hard-code, spelled out.
    assert formats.BLOCK_Q2_K.fields["d"][1] == 80
    assert formats.BLOCK_Q2_K.fields["dmin"][1] == 82
    assert formats.BLOCK_Q3_K.fields["scales"][1] == 96
    assert formats.BLOCK_Q3_K.fields["d"][1] == 108
    assert formats.BLOCK_Q4_K.fields["qs"][1] == 16
    assert formats.BLOCK_Q5_K.fields["qh"][1] == 16
    assert formats.BLOCK_Q5_K.fields["qs"][1] == 48
    assert formats.BLOCK_Q6_K.fields["scales"][1] == 192
    assert formats.BLOCK_Q6_K.fields["d"][1] == 208
    assert formats.BLOCK_Q5_1.fields["qs"][1] == 8


# ---------------------------------------------------------------------------
# reference.dequantize == gguf.quants.dequantize, bit for bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_dequantize_matches_gguf(qtype, rows):
    rng = np.random.default_rng([int(qtype), rows])
    for cols in _cols_cases(qtype):
        raw = reference.random_raw(qtype, rows, cols, rng)
        ours = reference.dequantize(raw, qtype, (rows, cols))
        assert ours.shape == (rows, cols)
        _assert_bits_equal(ours, _gguf(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(DENSE_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_dense_types_match_gguf_on_any_bits(qtype):
    # Dense types convert bits exactly, so even inf / NaN (with payloads) must agree.
    rng = np.random.default_rng(7)
    raw = reference.random_raw(qtype, 8, 512, rng, finite=False)
    ours = reference.dequantize(raw, qtype, (8, 512))
    assert not np.isfinite(ours).all()  # the case is really exercised
    _assert_bits_equal(ours, _gguf(raw, qtype))


def test_f16_every_bit_pattern():
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    _assert_bits_equal(reference.dequantize(raw, T.F16), _gguf(raw, T.F16))


# fp16 scales at the edges: largest finite, smallest / largest subnormal, zeros, ordinary.
EXTREME_HALVES = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0000, 0x8000, 0x3C00, 0xB555],
                          dtype=np.uint16)


@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if t not in DENSE_TYPES], ids=lambda t: t.name)
def test_dequantize_extreme_scales_match_gguf(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    rows, cols = 9, 2 * formats.block_size(qtype)[0]
    raw = reference.random_raw(qtype, rows, cols, rng)
    blocks = raw.reshape(-1).view(formats.BLOCK_DTYPES[qtype])
    for name in blocks.dtype.names:
        if blocks.dtype.fields[name][0] == np.dtype("<f2"):
            blocks[name] = rng.choice(EXTREME_HALVES, size=len(blocks)).view(np.float16)
    _assert_bits_equal(reference.dequantize(raw, qtype, (rows, cols)), _gguf(raw, qtype))


def test_dequantize_input_forms():
    rng = np.random.default_rng(3)
    raw = reference.random_raw(T.Q4_K, 3, 512, rng)
    expected = reference.dequantize(raw, T.Q4_K, (3, 512))
    _assert_bits_equal(reference.dequantize(raw.reshape(-1), T.Q4_K, (3, 512)), expected)
    _assert_bits_equal(reference.dequantize(raw, int(T.Q4_K)), expected)  # shape inferred
    # A float32 tensor as GGUFReader hands it over is taken as its bytes.
    w = rng.standard_normal((4, 6)).astype(np.float32)
    _assert_bits_equal(reference.dequantize(w, T.F32, (4, 6)), w)


def test_dequantize_rejects_bad_input():
    raw = np.zeros((2, 84), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs 252 bytes, raw has 168"):
        reference.dequantize(raw, T.Q2_K, (3, 256))
    with pytest.raises(ValueError, match="Q2_K.*100"):
        reference.dequantize(raw, T.Q2_K, (2, 100))
    with pytest.raises(ValueError, match="shape"):
        reference.dequantize(raw.reshape(-1), T.Q2_K)
    with pytest.raises(ValueError, match="84-byte"):
        reference.dequantize(np.zeros((2, 80), dtype=np.uint8), T.Q2_K)
    with pytest.raises(ValueError, match="not supported"):
        reference.dequantize(raw, T.IQ2_XXS, (2, 256))


def test_random_raw_is_seeded_and_finite():
    a = reference.random_raw(T.Q6_K, 4, 512, np.random.default_rng(5))
    b = reference.random_raw(T.Q6_K, 4, 512, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == (4, 2 * 210)
    assert np.array_equal(a, b)
    for qtype in ALL_TYPES:
        raw = reference.random_raw(qtype, 5, 256, np.random.default_rng(int(qtype)))
        assert np.isfinite(reference.dequantize(raw, qtype, (5, 256))).all()


# ---------------------------------------------------------------------------
# matmul_ref
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_1, T.F16], ids=lambda t: t.name)
def test_matmul_ref_is_x_times_w_transposed(qtype):
    rng = np.random.default_rng(int(qtype) + 200)
    rows, cols, n = 17, 2 * max(formats.block_size(qtype)[0], 128), 5
    raw = reference.random_raw(qtype, rows, cols, rng)
    blocks = raw.reshape(-1).view(formats.BLOCK_DTYPES[qtype])
    for name in blocks.dtype.names:  # ordinary scales, so float64 comparison is meaningful
        if blocks.dtype.fields[name][0] == np.dtype("<f2"):
            blocks[name] = (rng.standard_normal(blocks[name].shape) * 0.01).astype(np.float16)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    w = reference.dequantize(raw, qtype, (rows, cols))

    y = reference.matmul_ref(x, raw, qtype, (rows, cols))
    assert y.dtype == np.float32 and y.shape == (n, rows)
    np.testing.assert_array_equal(y, x @ w.T)
    y64 = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5 * np.abs(y64).max())

    y1 = reference.matmul_ref(x[0], raw, qtype, (rows, cols))
    assert y1.shape == (rows,)
    np.testing.assert_allclose(y1, y[0], rtol=1e-5, atol=1e-6 * np.abs(y64).max())


def test_matmul_ref_rejects_bad_x():
    raw = reference.random_raw(T.Q8_0, 2, 64, np.random.default_rng(0))
    with pytest.raises(TypeError, match="float32"):
        reference.matmul_ref(np.zeros((1, 64)), raw, T.Q8_0, (2, 64))
    with pytest.raises(ValueError, match="does not match"):
        reference.matmul_ref(np.zeros((1, 32), np.float32), raw, T.Q8_0, (2, 64))
