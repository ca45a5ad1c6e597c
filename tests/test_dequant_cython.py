"""The Cython dequantizer (weightstream.kernels._dequant) against weightstream.kernels.reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import formats, reference

_dequant = pytest.importorskip("weightstream.kernels._dequant")

ALL_TYPES = sorted(formats.SUPPORTED_TYPES, key=lambda t: t.name)
QUANT_TYPES = [t for t in ALL_TYPES if t not in (T.F32, T.F16, T.BF16)]


def _cython(raw: np.ndarray, qtype, cols: int, threads: int) -> np.ndarray:
    out = np.full((raw.shape[0], cols), np.nan, dtype=np.float32)  # NaN: catches unwritten values
    _dequant.dequantize_into(raw, int(qtype), out, threads)
    return out


def _assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    a_bits, b_bits = a.view(np.uint32), b.view(np.uint32)
    if not np.array_equal(a_bits, b_bits):
        bad = np.argwhere(a_bits != b_bits)
        i = tuple(bad[0])
        raise AssertionError(
            f"{len(bad)} of {a.size} values differ; first at {i}: {a[i]!r} vs {b[i]!r}"
        )


def test_module_tables_match_formats():
    assert _dequant.SUPPORTED == {int(t) for t in formats.SUPPORTED_TYPES}
    for qtype in formats.SUPPORTED_TYPES:
        assert _dequant.BLOCK_SIZES[int(qtype)] == formats.block_size(qtype)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(qtype, threads):
    elements = formats.block_size(qtype)[0]
    rng = np.random.default_rng([int(qtype), threads])
    for rows in (1, 3, 17, 129):
        for n_blocks in (1, 3):
            cols = n_blocks * max(elements, 32)  # dense types: 32 or 96 values per row
            raw = reference.random_raw(qtype, rows, cols, rng)
            _assert_bits_equal(_cython(raw, qtype, cols, threads), reference.dequantize(raw, qtype, (rows, cols)))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_dense_types_any_bits(qtype):
    # inf and NaN (payload and sign) come through unchanged, as in NumPy's casts.
    raw = reference.random_raw(qtype, 17, 256, np.random.default_rng(11), finite=False)
    _assert_bits_equal(_cython(raw, qtype, 256, 2), reference.dequantize(raw, qtype, (17, 256)))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(qtype):
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    _assert_bits_equal(_cython(raw, qtype, 256, 2), reference.dequantize(raw, qtype, (256, 256)))


# fp16 scales at the edges: largest finite, smallest / largest subnormal, zeros, ordinary.
EXTREME_HALVES = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0000, 0x8000, 0x3C00, 0xB555],
                          dtype=np.uint16)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_extreme_scales(qtype):
    # Where a compiler fuses d * q + m into an FMA, exact products keep the result the same;
    # extreme scales are where an inexact product would show.
    rng = np.random.default_rng(int(qtype) + 300)
    rows, cols = 33, 2 * formats.block_size(qtype)[0]
    raw = reference.random_raw(qtype, rows, cols, rng)
    blocks = raw.reshape(-1).view(formats.BLOCK_DTYPES[qtype])
    for name in blocks.dtype.names:
        if blocks.dtype.fields[name][0] == np.dtype("<f2"):
            blocks[name] = rng.choice(EXTREME_HALVES, size=len(blocks)).view(np.float16)
    _assert_bits_equal(_cython(raw, qtype, cols, 2), reference.dequantize(raw, qtype, (rows, cols)))


def test_zero_rows():
    out = np.empty((0, 256), np.float32)
    _dequant.dequantize_into(np.empty((0, 84), np.uint8), int(T.Q2_K), out, 2)


def test_rejects_bad_arguments():
    raw = np.zeros((2, 84), np.uint8)
    out = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="unsupported"):
        _dequant.dequantize_into(raw, int(T.IQ2_XXS), out, 1)
    with pytest.raises(ValueError, match="threads"):
        _dequant.dequantize_into(raw, int(T.Q2_K), out, 0)
    with pytest.raises(ValueError, match="rows"):
        _dequant.dequantize_into(raw, int(T.Q2_K), np.zeros((3, 256), np.float32), 1)
    with pytest.raises(ValueError, match="Q2_K.*bytes per row"):
        _dequant.dequantize_into(raw, int(T.Q2_K), np.zeros((2, 512), np.float32), 1)
    with pytest.raises(ValueError, match="Q2_K.*200.*whole number"):
        _dequant.dequantize_into(raw, int(T.Q2_K), np.zeros((2, 200), np.float32), 1)
    with pytest.raises(ValueError):  # not C-contiguous
        _dequant.dequantize_into(np.zeros((2, 168), np.uint8)[:, ::2], int(T.Q2_K), out, 1)
