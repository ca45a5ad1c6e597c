"""The fused k-quant matmul (weightstream.kernels._kquants) against the NumPy references.

Two references, two tolerances (NMSE, as llama.cpp's test-backend-ops):

* ``weightstream.kernels.quantize.matmul_q8_ref``: dequantized weights times the Q8_K-quantized activations,
  the exact math the kernel does (it quantizes x first). Only float summation order differs:
  NMSE < 1e-8.
* ``weightstream.kernels.reference.matmul_ref``: dequantized weights times the float activations. The kernel
  differs by the Q8_K rounding of x (int8 per 256), NMSE ~1e-5 on these inputs: NMSE < 1e-3,
  checked on outputs of >= 64 elements with cols >= 768 (a single dot product of 256 terms can
  cancel to near zero and make any relative measure meaningless).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import formats, reference
from weightstream.kernels.quantize import matmul_q8_ref, nmse

_kquants = pytest.importorskip("weightstream.kernels._kquants")

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
Q8_NMSE = 1e-8
FLOAT_NMSE = 1e-3


def _run(x: np.ndarray, raw: np.ndarray, qtype, threads: int = 1) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)  # NaN: catches unwritten
    _kquants.matmul_into(x, raw, int(qtype), out, threads)
    return out


def _case(qtype, rows, cols, n, seed):
    rng = np.random.default_rng([int(qtype), rows, cols, n, seed])
    raw = reference.random_raw(qtype, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    return x, raw


def test_module_tables():
    assert _kquants.SUPPORTED == {int(t) for t in TYPES}
    for qtype in TYPES:
        assert _kquants.BLOCK_BYTES[int(qtype)] == formats.block_size(qtype)[1]
    assert isinstance(_kquants.SIMD, bool)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(os.environ.get("WEIGHTSTREAM_PORTABLE", "0") not in ("", "0"), reason="a portable build: scalar C")
def test_the_native_build_uses_the_cpus_vector_units():
    """A -march=native build on an AVX2 CPU without AVX-512 (seen: AMD EPYC Zen 3) must not fall
    back to the scalar block loop (measured 40x slower there): each ISA the CPU has selects its path."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "f16c"} <= flags:
        assert _kquants.ISA == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert _kquants.ISA == "avx2"
    else:
        assert _kquants.ISA == "scalar"


# rows x cols x n: awkward row counts (1, 3, 17, 129), cols from one block to 14336, n across
# the 8-row tiles (1, 2, 7, 9, 64)
SHAPES = [
    (1, 256, 1),
    (3, 768, 2),
    (17, 4096, 7),
    (129, 256, 9),
    (17, 14336, 1),
    (3, 1280, 64),
    (129, 768, 2),
    (5, 17920, 3),  # 70 blocks a row: the kernel converts block scales 64 blocks at a time
]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", SHAPES, ids=lambda v: str(v))
def test_matches_q8_reference(qtype, rows, cols, n):
    x, raw = _case(qtype, rows, cols, n, 0)
    got = _run(x, raw, qtype)
    assert np.all(np.isfinite(got))
    err = nmse(got, matmul_q8_ref(x, raw, qtype, (rows, cols)))
    assert err < Q8_NMSE, f"{qtype.name} {rows}x{cols} n={n}: NMSE {err:.3g} vs Q8_K reference"


def test_q2_k_large_row_count():
    x, raw = _case(T.Q2_K, 4097, 512, 2, 0)
    got = _run(x, raw, T.Q2_K, threads=2)
    assert nmse(got, matmul_q8_ref(x, raw, T.Q2_K, (4097, 512))) < Q8_NMSE


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", [(17, 768, 7), (129, 4096, 2), (33, 1024, 64)],
                         ids=lambda v: str(v))
def test_close_to_float_reference(qtype, rows, cols, n):
    x, raw = _case(qtype, rows, cols, n, 1)
    got = _run(x, raw, qtype)
    err = nmse(got, reference.matmul_ref(x, raw, qtype, (rows, cols)))
    assert err < FLOAT_NMSE, f"{qtype.name} {rows}x{cols} n={n}: NMSE {err:.3g} vs float reference"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_threads_give_identical_results(qtype):
    x, raw = _case(qtype, 67, 1536, 11, 2)
    one = _run(x, raw, qtype, threads=1)
    two = _run(x, raw, qtype, threads=2)
    assert np.array_equal(one.view(np.uint32), two.view(np.uint32))


def test_tiling_does_not_change_results():
    """Cutting rows into tiles and block ranges changes nothing but summation order."""
    x, raw = _case(T.Q4_K, 40, 4096, 20, 3)
    expected = matmul_q8_ref(x, raw, T.Q4_K, (40, 4096))
    saved = _kquants._tuning()
    try:
        # wr = 20: a group of more than 16 rows is summed in two reduction trees
        for wr, l1_act, l1_max in [(1, 1, 1), (3, 2000, 1), (16, 16384, 1 << 30), (20, 16384, 1 << 30)]:
            _kquants._tuning(wr, l1_act, l1_max)
            assert nmse(_run(x, raw, T.Q4_K), expected) < Q8_NMSE
    finally:
        _kquants._tuning(*saved)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("wr", [16, 20])
def test_decode_stream_equals_the_tile_path(qtype, wr):
    """One activation row (decode) reads a group's rows as one stream of blocks (ws_kq_stream:
    scales gathered 8 blocks at a time across row ends); two rows take the per-row tile path.
    Each output must have the same bits either way: row widths of 1, 3, 8, 9 and 17 blocks (a
    gather chunk ending inside, at and past a row's end), groups of 1, 5, 16, 17 and 40 rows."""
    saved = _kquants._tuning()
    try:
        _kquants._tuning(wr, saved[1], saved[2])  # wr = 20: a stream longer than 16 rows
        for nb in (1, 3, 8, 9, 17):
            for rows in (1, 5, 16, 17, 40):
                x, raw = _case(qtype, rows, 256 * nb, 2, 4)
                one = _run(x[:1], raw, qtype, threads=2)
                two = _run(x, raw, qtype, threads=2)
                assert np.array_equal(one[0].view(np.uint32), two[0].view(np.uint32)), (nb, rows)
    finally:
        _kquants._tuning(*saved)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_stream_of_wide_rows_equals_the_tile_path(qtype):
    """Rows of 511-513 blocks read whole (the L1 cut lifted): the stream's copy of the row's
    block scales holds 512 blocks; a wider row goes through the tile path one row at a time.
    Both must give the two-row tile path's bits."""
    saved = _kquants._tuning()
    try:
        _kquants._tuning(saved[0], saved[1], 1 << 30)
        for nb in (511, 512, 513):
            x, raw = _case(qtype, 3, 256 * nb, 2, 5)
            one = _run(x[:1], raw, qtype, threads=2)
            two = _run(x, raw, qtype, threads=2)
            assert np.array_equal(one[0].view(np.uint32), two[0].view(np.uint32)), nb
            assert nmse(one[0], matmul_q8_ref(x[:1], raw, qtype, (3, 256 * nb))[0]) < Q8_NMSE
    finally:
        _kquants._tuning(*saved)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_tile_height_gives_the_decode_bits(qtype):
    """n activation rows go in equal tiles of up to WS_KQ_NRMAX (8 on AVX-512: 9 rows are 5 + 4);
    every tile height must give each row the bits its one-row decode gives, 1 and 2 threads. (Rows
    the L1 cut splits into block ranges sum range by range: test_decode_stream_of_wide_rows
    lifts the cut.)"""
    for cols in (1024, 2048):
        x, raw = _case(qtype, 19, cols, 9, 6)
        one = np.concatenate([_run(x[r:r + 1], raw, qtype) for r in range(len(x))])
        for n in range(2, len(x) + 1):
            for threads in (1, 2):
                got = _run(x[:n], raw, qtype, threads)
                assert np.array_equal(got.view(np.uint32), one[:n].view(np.uint32)), (cols, n, threads)

def test_q2_k_extreme_blocks_stay_exact():
    """Q2_K at its largest products: every code 3, every scale 15 (the tile path multiplies codes
    by scales in bytes, 45, and adds two chunks' int16 products, |sum| <= 23040 with |x| <= 127):
    activations of one sign (the largest sums) and of alternating signs. Every tile height gives
    the one-row decode's bits, and both the Q8_K reference's values."""
    rows, cols = 9, 512
    block = np.zeros(84, dtype=np.uint8)
    block[:16] = 0xFF                                  # scale 15, min 15 for the 16 sub-blocks
    block[16:80] = 0xFF                                # every 2-bit code 3
    block[80:84] = np.array([1.0, 0.5], dtype=np.float16).view(np.uint8)  # d, dmin
    raw = np.tile(block, rows * cols // 256).reshape(rows, -1)
    sign = np.where(np.arange(cols) % 2, -1.0, 1.0).astype(np.float32)
    x = np.stack([np.full(cols, 3.0, np.float32), np.full(cols, -2.0, np.float32), 1.5 * sign,
                  -sign, np.full(cols, 1.0, np.float32), sign, -2.5 * sign, np.full(cols, -1.0, np.float32),
                  0.5 * sign]).astype(np.float32)  # 9 rows: tiles of 1..8 (AVX-512's most) and 5 + 4
    expected = matmul_q8_ref(x, raw, T.Q2_K, (rows, cols))
    one = np.concatenate([_run(x[r:r + 1], raw, T.Q2_K) for r in range(len(x))])
    assert nmse(one, expected) < Q8_NMSE
    for n in range(2, len(x) + 1):
        got = _run(x[:n], raw, T.Q2_K, threads=2)
        assert np.array_equal(got.view(np.uint32), one[:n].view(np.uint32)), n


@pytest.mark.parametrize("qtype", [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_largest_codes_stay_exact(qtype):
    """Every code at its largest (all bits set: Q6_K 63, Q5_K 31, Q4_K 15, Q3_K 7) against
    activations of one sign: the AVX-512 kernel packs each lane's sum of 4 code x activation
    products into int16 (|sum| <= 4 * 63 * 127 = 32004) before scaling. Against the Q8_K
    reference, and every tile height gives the one-row decode's bits."""
    rows, cols = 9, 512
    block = np.full(formats.block_size(qtype)[1], 0xFF, dtype=np.uint8)
    d_at = {T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for o, v in zip(d_at, (0.5, 0.25)):
        block[o:o + 2] = np.array([v], dtype=np.float16).view(np.uint8)
    raw = np.tile(block, rows * cols // 256).reshape(rows, -1)
    x = np.stack([np.full(cols, v, np.float32) for v in (3.0, -2.0, 1.0, -1.0, 0.5, 7.0, -5.0, 2.0, -3.0)])
    expected = matmul_q8_ref(x, raw, qtype, (rows, cols))
    one = np.concatenate([_run(x[r:r + 1], raw, qtype) for r in range(len(x))])
    assert nmse(one, expected) < Q8_NMSE
    for n in range(2, len(x) + 1):
        got = _run(x[:n], raw, qtype, threads=2)
        assert np.array_equal(got.view(np.uint32), one[:n].view(np.uint32)), n

def test_zero_activations_and_zero_blocks():
    x, raw = _case(T.Q2_K, 5, 512, 3, 4)
    x[1] = 0.0                  # an all-zero row: Q8_K d = 0
    x[2, :256] = 0.0            # one all-zero block
    got = _run(x, raw, T.Q2_K)
    assert np.all(got[1] == 0.0)
    assert nmse(got, matmul_q8_ref(x, raw, T.Q2_K, (5, 512))) < Q8_NMSE


def test_empty_shapes():
    raw = np.zeros((0, 84), np.uint8)
    out = np.empty((3, 0), np.float32)
    _kquants.matmul_into(np.ones((3, 256), np.float32), raw, int(T.Q2_K), out, 1)
    out = np.empty((0, 4), np.float32)
    _kquants.matmul_into(np.ones((0, 256), np.float32), np.zeros((4, 84), np.uint8), int(T.Q2_K), out, 1)


def test_bad_inputs_raise():
    x, raw = _case(T.Q2_K, 4, 512, 2, 5)
    out = np.empty((2, 4), np.float32)
    with pytest.raises(ValueError, match="Q4_0 is not supported"):
        _kquants.matmul_into(x, raw, int(T.Q4_0), out, 1)
    with pytest.raises(ValueError, match="not supported"):
        _kquants.matmul_into(x, raw, 9999, out, 1)
    with pytest.raises(ValueError, match="threads"):
        _kquants.matmul_into(x, raw, int(T.Q2_K), out, 0)
    with pytest.raises(ValueError, match="multiple of 256"):
        _kquants.matmul_into(np.ones((2, 300), np.float32), raw, int(T.Q2_K), out, 1)
    with pytest.raises(ValueError, match="bytes per row"):
        _kquants.matmul_into(x, np.ascontiguousarray(raw[:, :100]), int(T.Q2_K), out, 1)
    with pytest.raises(ValueError, match="bytes per row"):
        _kquants.matmul_into(x, raw, int(T.Q4_K), out, 1)
    with pytest.raises(ValueError, match="out must be"):
        _kquants.matmul_into(x, raw, int(T.Q2_K), np.empty((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="out must be"):
        _kquants.matmul_into(x, raw, int(T.Q2_K), np.empty((3, 4), np.float32), 1)
    with pytest.raises(ValueError):  # dtype: the typed memoryview refuses float64
        _kquants.matmul_into(x.astype(np.float64), raw, int(T.Q2_K), out, 1)
    with pytest.raises(ValueError):  # layout: not C-contiguous
        _kquants.matmul_into(np.asfortranarray(x), raw, int(T.Q2_K), out, 1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 17, 768])
def test_matvec_many_equals_one_call_per_row(qtype, rows):
    """A decode step's experts in one call: row t is x[t] @ W_t.T with the bits matmul_into gives."""
    if not _kquants.matvec_many_supported(int(qtype)):
        pytest.skip("matmul_into takes another path at n = 1 here")
    rng = np.random.default_rng([int(qtype), rows])
    cols, tasks = 512, 5
    ws = [reference.random_raw(qtype, rows, cols, rng) for _ in range(tasks)]
    x = rng.standard_normal((tasks, cols)).astype(np.float32)
    out = np.full((tasks, rows), np.nan, dtype=np.float32)
    for threads in (1, 2):
        _kquants.matvec_many_into(x, ws, int(qtype), out, threads)
        for t in range(tasks):
            assert np.array_equal(out[t:t + 1], _run(x[t:t + 1], ws[t], qtype, threads)), (t, threads)


def test_matvec_many_bad_inputs():
    rng = np.random.default_rng(0)
    ws = [reference.random_raw(T.Q2_K, 8, 256, rng) for _ in range(2)]
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="2 weights, x has 3 rows"):
        _kquants.matvec_many_into(np.zeros((3, 256), np.float32), ws, int(T.Q2_K), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"weight 1 is uint8\[4, 84\], expected \[8, 84\]"):
        _kquants.matvec_many_into(x, [ws[0], ws[1][:4]], int(T.Q2_K), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="type Q8_0 is not supported"):
        _kquants.matvec_many_into(x, ws, int(T.Q8_0), np.zeros((2, 8), np.float32))


@pytest.mark.parametrize("permuted", [False, True])
def test_the_kernels_q8_k_is_ggmls_bit_for_bit(permuted):
    """The vectorised activation quantizer (kernels/csrc/q8k_simd.h) == quantize_q8_k (NumPy,
    ggml's quantize_row_q8_K_ref): quants, scales and the per-16 min-term sums d * bsum, with ties
    of magnitude (the first wins, with its sign), half-way products, zero blocks."""
    from weightstream.kernels.quantize import quantize_q8_k
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    x[1, :256] = 0  # a zero block
    x[2, 10], x[2, 3] = -5.0, 5.0  # the same magnitude twice: the first (+5) sets the sign
    x[3, 256:300], x[3, 300:310] = -2.5, 2.5
    x[4] = np.round(x[4] * 4) / 4  # quarter steps: many products land half-way
    x[5] *= 1e-30  # tiny scales
    qs, d, fb, bad = _kquants.quantize_q8_k_into(x, permuted)
    ref = quantize_q8_k(x)
    j = np.arange(256)
    order = 64 * ((j // 32) % 4) + 32 * (j // 128) + j % 32 if permuted else j  # where element j is stored
    assert np.array_equal(qs.reshape(6, 4, 256)[:, :, order], ref.qs.reshape(6, 4, 256))
    assert np.array_equal(d.view(np.uint32), ref.d.view(np.uint32))
    if _kquants.BSUMS:  # AVX-512 and AVX2 builds: each block's int16 bsums in the first half of its 16-float slot
        assert np.array_equal(fb.view(np.int16).reshape(6, 4, 32)[:, :, :16], ref.bsums.reshape(6, 4, 16))
    else:
        fb_ref = np.repeat(ref.d, 16, axis=1) * ref.bsums.astype(np.float32)
        assert np.array_equal(fb.view(np.uint32), fb_ref.view(np.uint32))
    assert not bad.any()
    x[0, 5], x[3, 700] = np.nan, -np.inf
    assert _kquants.quantize_q8_k_into(x, permuted)[3].tolist() == [1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 3])
def test_matmul_many_equals_one_call_per_task(qtype, threads):
    """A prompt batch's experts in one call: each task (its own rows, its own matrix) gets the
    bits matmul_into gives it alone, a NaN row included; row counts of 1 to 7 (under AMX's 8)
    and 8 to 40 (Q2_K: AMX tiles where built, in the same call)."""
    rng = np.random.default_rng(int(qtype) + threads)
    ns = [1, 3, 7, 2, 17, 5, 1, 8, 40]
    xs = [rng.standard_normal((n, 768)).astype(np.float32) for n in ns]
    xs[2][1, 5] = np.nan
    ws = [reference.random_raw(qtype, 40, 768, rng) for _ in ns]
    outs = [np.full((n, 40), 7.0, np.float32) for n in ns]
    _kquants.matmul_many_into(xs, ws, int(qtype), outs, threads)
    for x, w, got in zip(xs, ws, outs):
        assert np.array_equal(got, _run(x, w, qtype), equal_nan=True)
    assert np.isnan(outs[2][1]).all() and np.isfinite(outs[2][0]).all()


def test_matmul_many_bad_inputs():
    rng = np.random.default_rng(9)
    w = reference.random_raw(T.Q4_K, 16, 512, rng)
    x, out = np.zeros((2, 512), np.float32), np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="2 inputs, 1 weights"):
        _kquants.matmul_many_into([x, x], [w], int(T.Q4_K), [out, out])
    with pytest.raises(ValueError, match=r"task 1: .*out \[2, 15\]"):
        _kquants.matmul_many_into([x, x], [w, w], int(T.Q4_K), [out, np.zeros((2, 15), np.float32)])
    assert _kquants.matmul_many_supported(int(T.Q2_K), 8)  # AMX-sized tasks too
    assert not _kquants.matmul_many_supported(int(T.Q8_0), 1)
