"""Numba fused matmul kernels (kernels/numba/) against the NumPy references.

Every type, both tiers (the AVX-512 or AVX2 int8 kernels where the CPU has them, and the portable
plain-loop kernels), over seeded random blocks and awkward sizes. Kernels that quantize their
activations are held to weightstream.kernels.quantize.matmul_q8_ref (only float summation order differs:
NMSE < 1e-8) and, loosely, to weightstream.kernels.reference.matmul_ref; float kernels to matmul_ref.
"""
import itertools

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels.numba import matmul as nk
from weightstream import kernels
from weightstream.kernels import formats, quantize, reference

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
LEGACY_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
DENSE_TYPES = [T.F32, T.F16, T.BF16]
ROWS = (1, 3, 17, 129)
NS = (1, 2, 7, 64)
COLS = {**{t: (256, 768, 4096) for t in K_TYPES},
        **{t: (32, 96, 576, 4096) for t in LEGACY_TYPES},
        **{t: (1, 33, 768, 4096) for t in DENSE_TYPES}}

Q8_NMSE = 1e-8      # int8-activation kernels vs matmul_q8_ref: float summation order only
FLOAT_NMSE = 1e-10  # float kernels vs matmul_ref
QUANT_NMSE = 1e-2   # int8-activation kernels vs matmul_ref: activation rounding (a sanity bound)

TIERS = [pytest.param(True, id="simd"), pytest.param(False, id="portable")]


def weights(qtype, rows, cols, rng):
    """Random valid tensor bytes; dense types from normal values (random bits overflow a dot)."""
    if qtype in DENSE_TYPES:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == T.F16:
            w = w.astype(np.float16)
        elif qtype == T.BF16:
            w = (w.view(np.uint32) >> 16).astype(np.uint16)
        return np.ascontiguousarray(w).view(np.uint8).reshape(rows, -1)
    return reference.random_raw(qtype, rows, cols, rng)


def run(x, raw, qtype, threads, simd=True):
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
    nk.matmul_into(x, raw, qtype, out, threads, _simd=simd)
    return out


@pytest.mark.parametrize("simd", TIERS)
@pytest.mark.parametrize("qtype", K_TYPES + LEGACY_TYPES + DENSE_TYPES, ids=lambda t: t.name)
def test_matches_reference(qtype, simd):
    rng = np.random.default_rng(int(qtype) * 7 + simd)
    quantized_acts = nk.strategy(qtype, simd) != "float"
    worst = worst_ref = 0.0
    for rows, cols in itertools.product(ROWS, COLS[qtype]):
        raw = weights(qtype, rows, cols, rng)
        x = rng.standard_normal((max(NS), cols)).astype(np.float32)
        for n in NS:
            xn = x[:n]
            out = run(xn, raw, qtype, 1, simd)
            np.testing.assert_array_equal(out, run(xn, raw, qtype, 2, simd))  # threads: same bits
            ref = reference.matmul_ref(xn, raw, qtype)
            case = f"{qtype.name} rows={rows} cols={cols} n={n}"
            if quantized_acts:
                err = quantize.nmse(out, quantize.matmul_q8_ref(xn, raw, qtype, (rows, cols)))
                assert err < Q8_NMSE, case
                if out.size >= 1000:  # a few outputs can cancel to ~0, where rounding x dominates
                    worst_ref = max(worst_ref, quantize.nmse(out, ref))
                    assert quantize.nmse(out, ref) < QUANT_NMSE, case
            else:
                err = worst_ref_case = quantize.nmse(out, ref)
                assert err < FLOAT_NMSE, case
                worst_ref = max(worst_ref, worst_ref_case)
            worst = max(worst, err)
    print(f"{qtype.name} {nk.strategy(qtype, simd)}: worst NMSE {worst:.1e} vs its reference, "
          f"{worst_ref:.1e} vs matmul_ref")


def test_strategy():
    assert nk.strategy(T.Q6_K, simd=False) == "int16"
    assert nk.strategy(T.F16) == "float"
    assert nk.strategy(T.Q2_K, simd=False) == "int16"
    assert nk.strategy(T.Q8_0, simd=False) == "float"
    if nk.HAVE_SIMD:
        tier = f"{nk.SIMD_TIER}-int8"
        assert nk.strategy(T.Q2_K) == nk.strategy(T.Q4_1) == nk.strategy(T.Q8_0) == tier
        assert all(nk.strategy(t) == tier for t in K_TYPES)
    else:
        assert nk.strategy(T.Q2_K, simd=True) == "int16"
    assert {T.Q2_K, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F16} <= nk.SUPPORTED


# ---------------------------------------------------------------------------
# k-quant SIMD kernels against the portable kernels and the Cython kernels, same Q8_K activations
# ---------------------------------------------------------------------------

# byte ranges of each type's fp16 fields and sub-block scales (kernels/formats.py)
_K_FIELDS = {T.Q2_K: ((80, 82), (0, 16)), T.Q3_K: ((108,), (96, 108)), T.Q4_K: ((0, 2), (4, 16)), T.Q5_K: ((0, 2), (4, 16)),
             T.Q6_K: ((208,), (192, 208))}


def extreme_weights(qtype, rows, cols, rng):
    """Random blocks, and in every row block 0 with all codes at their maximum and block 1 at
    their minimum, each with the largest scales (and mins) of either sign the format holds; fp16
    fields 1.0 there, so sums stay finite while the int8 / int16 intermediates are at their widest."""
    raw = reference.random_raw(qtype, rows, cols, rng)
    _, nbytes = formats.block_size(qtype)
    halves, (s0, s1) = _K_FIELDS[qtype]
    # Q3_K: 0x00 is scale -32 (the largest magnitude); Q6_K: 0x80 is -128; Q2_K: 15 and min 15;
    # Q4_K/Q5_K: 63 and min 63
    scale_byte = {T.Q3_K: 0x00, T.Q6_K: 0x80}.get(qtype, 0xFF)
    for blk, code in ((0, 0xFF), (1, 0x00)):
        if cols // 256 <= blk:
            break
        b = raw[:, nbytes * blk: nbytes * (blk + 1)]
        b[:] = code
        b[:, s0:s1] = scale_byte
        for h in halves:
            b[:, h:h + 2] = (0x00, 0x3C)  # fp16 1.0
    return raw


SIMD_K_TYPES = K_TYPES


@pytest.mark.skipif(not nk.HAVE_SIMD, reason="no AVX-512 BW/VNNI nor AVX2: the SIMD tier is not used")
@pytest.mark.parametrize("n", (1, 3, 8, 64))
@pytest.mark.parametrize("qtype", SIMD_K_TYPES, ids=lambda t: t.name)
def test_k_simd_matches_portable_and_cython(qtype, n):
    """SIMD kernel == portable (generic) kernel == Cython kernel on the same int8 activations,
    up to float summation order; rows (35) not a multiple of the 16-row task."""
    rng = np.random.default_rng(100 * int(qtype) + n)
    rows, cols = 35, 1024
    raw = extreme_weights(qtype, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x[0, :256] = -1.0                 # every quant of block 0 at -127...
    if n > 1:
        x[1, 256:512] = 1.0           # ...and at +127 (Q8_K's d is negative there)
    x[-1, 512:768] *= 1000.0
    simd, portable = run(x, raw, qtype, 1), run(x, raw, qtype, 1, simd=False)
    assert nk.strategy(qtype) == f"{nk.SIMD_TIER}-int8"
    np.testing.assert_array_equal(simd, run(x, raw, qtype, 2))  # threads: same bits
    assert quantize.nmse(simd, portable) < Q8_NMSE
    assert quantize.nmse(simd, quantize.matmul_q8_ref(x, raw, qtype, (rows, cols))) < Q8_NMSE
    if "cython" in kernels.backends.available(qtype):
        cy = kernels.matmul(x, kernels.QTensor(qtype, (rows, cols), raw), threads=1, backend="cython")
        assert quantize.nmse(simd, cy) < Q8_NMSE
    got = kernels.matmul(x, kernels.QTensor(qtype, (rows, cols), raw), threads=1, backend="numba")
    np.testing.assert_array_equal(got, simd)
    assert quantize.nmse(got, reference.matmul_ref(x, raw, qtype)) < QUANT_NMSE


@pytest.mark.skipif(not nk.HAVE_SIMD, reason="no AVX-512 BW/VNNI nor AVX2: the SIMD tier is not used")
@pytest.mark.parametrize("qtype", LEGACY_TYPES, ids=lambda t: t.name)
def test_legacy_extreme_codes(qtype):
    """Every code byte at 0x00, 0xFF or 0x80 (Q8_0: -128, the largest magnitude), fp16 fields 1.0,
    against activations whose quants are all +-127: the SIMD tier's int16 pair sums (AVX2's
    vpmaddubsw saturates) at their widest, held to matmul_q8_ref."""
    rng = np.random.default_rng(200 + int(qtype))
    rows, cols = 6, 256
    raw = reference.random_raw(qtype, rows, cols, rng)
    _, nbytes = formats.block_size(qtype)
    halves = 2 if qtype in (T.Q4_1, T.Q5_1) else 1  # d (and m) lead every legacy block
    blocks = raw.reshape(rows, -1, nbytes)
    for r, code in enumerate((0x00, 0xFF, 0x80)):
        blocks[r, :, 2 * halves:] = code
        blocks[r, :, :2 * halves] = [0x00, 0x3C] * halves
    x = np.concatenate([np.ones((1, cols)), -np.ones((1, cols)), rng.standard_normal((2, cols))]).astype(np.float32)
    out = run(x, raw, qtype, 1)
    assert quantize.nmse(out, quantize.matmul_q8_ref(x, raw, qtype, (rows, cols))) < Q8_NMSE


def test_half_at_converts_every_fp16_exactly():
    """legacy.half_at (the SIMD kernels' fp16 scales, converted in integer registers) and
    legacy.half_pair (two at once, vcvtph2ps) against NumPy for all 65536 bit patterns: exact,
    subnormals included; Inf made NaN."""
    from numba import njit, types
    from numba.extending import intrinsic
    from weightstream.kernels.numba import legacy as lg

    @intrinsic
    def half_at(typingctx, a, i):
        def codegen(context, builder, signature, args):
            ptr, _ = lg.arr(context, builder, signature.args[0], args[0])
            return lg.half_at(builder, ptr, builder.mul(args[1], lg.c64(2)))
        return types.float32(a, i), codegen

    @njit
    def convert(a, out):
        for i in range(out.size):
            out[i] = half_at(a, i)

    @intrinsic
    def half_pair(typingctx, a, i):  # the pair at 4 i (lg.half_pair: a k-quant's d, dmin)
        def codegen(context, builder, signature, args):
            ptr, _ = lg.arr(context, builder, signature.args[0], args[0])
            d, m = lg.half_pair(builder, ptr, builder.mul(args[1], lg.c64(4)))
            return context.make_tuple(builder, signature.return_type, [d, m])
        return types.UniTuple(types.float32, 2)(a, i), codegen

    @njit
    def convert_pairs(a, out):
        for i in range(out.size // 2):
            out[2 * i], out[2 * i + 1] = half_pair(a, i)

    bits = np.arange(65536, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want) | np.isinf(want)
    for fn in (convert, convert_pairs):
        out = np.empty(65536, np.float32)
        fn(bits.view(np.uint8), out)
        assert np.isnan(out[nan]).all()
        np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0 too


# ---------------------------------------------------------------------------
# Activation quantizers: bit for bit with weightstream.kernels.quantize
# ---------------------------------------------------------------------------


def awkward_activations(rng, n, cols):
    x = rng.normal(0, 1, (n, cols)).astype(np.float32)
    x[1, :256] = 0                      # an all-zero block
    x[2, 5] = -40                       # a negative extreme
    x[2, 300], x[2, 301] = 9.0, -9.0    # equal magnitudes: the first wins
    x[0, 40:72] = np.float32(0.5) * np.arange(32, dtype=np.float32) / 31  # halves to round
    return x


def test_quantize_q8_k_bit_exact():
    x = awkward_activations(np.random.default_rng(3), 4, 768)
    ref = quantize.quantize_q8_k(x)
    qs, d, bsums = nk.quantize_q8_k(x)  # block-major [nb, n, 256]
    np.testing.assert_array_equal(qs.transpose(1, 0, 2).reshape(4, 768), ref.qs)
    np.testing.assert_array_equal(d.T, ref.d)
    np.testing.assert_array_equal(bsums.transpose(1, 0, 2).reshape(4, -1), ref.bsums)
    perm = np.random.default_rng(0).permutation(256)
    qp, _, _ = nk.quantize_q8_k(x, perm)
    np.testing.assert_array_equal(qp, qs[:, :, perm])


def test_quantize_q8_0_bit_exact():
    x = awkward_activations(np.random.default_rng(4), 3, 576)
    ref0, ref1 = quantize.quantize_q8_0(x), quantize.quantize_q8_1(x)
    qs, d, qsum = nk.quantize_q8_0(x)  # block-major [nb, n, 32]
    np.testing.assert_array_equal(qs.transpose(1, 0, 2).reshape(3, 576), ref0.qs)
    np.testing.assert_array_equal(d, ref0.d)
    np.testing.assert_array_equal(d, ref1.d)
    np.testing.assert_array_equal(qsum, ref0.qs.reshape(3, -1, 32).sum(2))
    # split order (the SIMD kernels' for the nibble types): the first 16 of 18 blocks in pairs
    qp, dp, qsump = nk.quantize_q8_0(x, nsplit=16)
    order = np.r_[np.add.outer([0, 8], [0, 2, 4, 6, 1, 3, 5, 7]).ravel(), 16, 17]  # SCALE_ORDER per group
    np.testing.assert_array_equal(dp, d[:, order])
    np.testing.assert_array_equal(qsump, qsum[:, order])
    pairs = qs[:16].reshape(8, 2, 3, 2, 16)  # [pair, block of the pair, row, half, 16]
    np.testing.assert_array_equal(qp[:16].reshape(8, 2, 3, 2, 16), pairs.transpose(0, 3, 2, 1, 4))
    np.testing.assert_array_equal(qp[16:], qs[16:])


# ---------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------


def test_restores_thread_count_and_handles_empty():
    rng = np.random.default_rng(5)
    raw = reference.random_raw(T.Q2_K, 4, 256, rng)
    before = numba.get_num_threads()
    run(rng.standard_normal((2, 256)).astype(np.float32), raw, T.Q2_K, 1)
    assert numba.get_num_threads() == before
    nk.matmul_into(np.zeros((0, 256), np.float32), raw, T.Q2_K, np.zeros((0, 4), np.float32), 2)
    empty = np.zeros((0, 84), np.uint8)
    nk.matmul_into(np.zeros((3, 256), np.float32), empty, T.Q2_K, np.zeros((3, 0), np.float32), 2)
    out = np.full((2, 3), np.nan, np.float32)
    nk.matmul_into(np.zeros((2, 0), np.float32), np.zeros((3, 0), np.uint8), T.Q8_0, out, 2)
    assert not out.any()
    # more threads than Numba has: capped, not an error
    run(rng.standard_normal((1, 256)).astype(np.float32), raw, T.Q2_K, 1000)


def _bad_cases():
    rng = np.random.default_rng(6)
    raw = reference.random_raw(T.Q4_K, 5, 512, rng)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    out = np.empty((2, 5), np.float32)
    wide = np.empty((2, 10), np.float32)
    return [
        ((x.astype(np.float64), raw, T.Q4_K, out, 1), "x must be a 2-D float32"),
        ((x[0], raw, T.Q4_K, out, 1), "x must be a 2-D float32"),
        ((np.asfortranarray(x), raw, T.Q4_K, out, 1), "x must be C-contiguous"),
        ((x.tolist(), raw, T.Q4_K, out, 1), "x must be a NumPy array"),
        ((x, raw.view(np.int8), T.Q4_K, out, 1), "w must be a 2-D uint8"),
        ((x, raw[:, :-1], T.Q4_K, out, 1), "w must be C-contiguous"),
        ((x, np.ascontiguousarray(raw[:, :144]), T.Q4_K, out, 1), "144 bytes per row; 512 columns need 288"),
        ((x[:, :500].copy(), raw, T.Q4_K, out, 1), "not a multiple of the 256-element block"),
        ((x, raw, T.Q4_K, wide, 1), r"out must have shape \(n, rows\) = \(2, 5\)"),
        ((x, raw, T.Q4_K, out.astype(np.float64), 1), "out must be a 2-D float32"),
        ((x, raw, T.IQ2_XXS, out, 1), "IQ2_XXS is not supported"),
        ((x, raw, 9999, out, 1), "unknown GGML type"),
        ((x, raw, T.Q4_K, out, 0), "threads must be a positive integer"),
        ((x, raw, T.Q4_K, out, 1.5), "threads must be a positive integer"),
        ((x, raw, T.Q4_K, x[:, :5], 1), "out must be C-contiguous"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_inputs_raise(case):
    args, message = _bad_cases()[case]
    with pytest.raises(ValueError, match=message):
        nk.matmul_into(*args)


def test_out_overlapping_input_raises():
    x = np.zeros((1, 32), np.float32)
    w = np.zeros((32, 34), np.uint8)
    with pytest.raises(ValueError, match="must not overlap"):
        nk.matmul_into(x, w, T.Q8_0, x, 1)


def test_q2_k_lookup_tables_scale_every_code_and_match_the_cython_kernels():
    """The Numba Q2_K kernel's tables (index = (code bits & mask) | base, T[index] = q * sc of the
    sub-block) written out by hand from kernels/csrc/kquants_simd.h: for every plane, 128-bit lane
    and code, the table built from random scale bytes must hold q * (low nibble of the sub-block's
    scale byte), and each table must equal the header's (LLVM IR cannot include it)."""
    import re
    from pathlib import Path
    from weightstream.kernels.numba import kquants as nq

    rng = np.random.default_rng(11)
    for _ in range(20):
        sc = rng.integers(0, 256, 16)
        table = [(int(sc[nq._Q2K_PERM[i]]) & nq._Q2K_NIB[i]) * (1 + nq._Q2K_QGE2[i] + nq._Q2K_QEQ3[i])
                 for i in range(64)]
        for plane, lane, q in itertools.product(range(4), range(4), range(4)):
            code_bits = q << (2 * plane) if plane < 3 else q  # plane 3 is shifted down first
            index = (code_bits & nq._Q2K_MASK[plane]) | nq._Q2K_BASES[plane][lane]
            sub_block = 8 * (lane // 2) + 2 * plane + lane % 2
            assert table[index] == q * (int(sc[sub_block]) & 15), (plane, lane, q)

    header = (Path(kernels.__file__).parent / "csrc" / "kquants_simd.h").read_text()
    def array(name):
        body = re.search(name + r"\[64\][^{]*\{([^}]*)\}", header).group(1)
        return [int(v) for v in body.replace("\n", " ").split(",") if v.strip()]
    assert array("ws_q2k_perm") == nq._Q2K_PERM
    assert array("ws_q2k_nib") == nq._Q2K_NIB
    for name, bits in (("WS_Q2K_QGE2", nq._Q2K_QGE2), ("WS_Q2K_QEQ3", nq._Q2K_QEQ3)):
        value = int(re.search(r"#define " + name + r" (0x[0-9a-f]+)ull", header).group(1), 16)
        assert [(value >> i) & 1 for i in range(64)] == bits, name
    unpack = header[header.index("WS_AI void ws_unpack_q2k"):header.index("WS_AI void ws_unpack_q3k")]
    bases = [tuple(int(v) for v in m.split(",")) for m in re.findall(r"WS_LANES8\(([\d, ]+)\)", unpack)]
    assert bases == [tuple(b) for b in nq._Q2K_BASES]
    masks = [3 if whole == "m3" else int(hex_value, 16)
             for whole, hex_value in re.findall(r"ternarylogic_epi32\(.*?, (m3|_mm512_set1_epi8\((0x[0-9A-Fa-f]+)\))", unpack)]
    assert masks == list(nq._Q2K_MASK)
