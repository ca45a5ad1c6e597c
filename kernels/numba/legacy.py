"""Numba kernels for the legacy 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the
dense types (F32, F16, BF16), plus the LLVM-IR helpers that kquants.py shares.

Used through ``weightstream.kernels.numba.matmul.matmul_into``; everything here trusts its inputs.

Two tiers per legacy type:

* ``_<type>_simd_kernel``: int8 activations (Q8_0 for Q4_0 / Q5_0 / Q8_0, Q8_1 for Q4_1 / Q5_1:
  int8 quants, fp16-rounded scale ``xd`` and ``qsum``, the sum of a block's quants), emitted as
  explicit LLVM vector IR by an ``@intrinsic`` (``vpdpbusd`` on AVX-512 VNNI, ``vpmaddubsw`` +
  ``vpmaddwd`` on AVX2; see ``ISA``). A row's blocks go in groups of ``GROUP`` (8): their fp16
  scales converted as one vector (``scales8``) times the activations' 8 dx; the nibble types two
  blocks a register (``_pair_u8``, activations in split order: ``split_blocks``), one int8 product
  per pair and activation row, whose two halves take their blocks' scales by one in-lane shuffle
  (``SCALE_ORDER``); Q8_0 a block a register, |q| times the activations with q's signs
  (``vpsignb``: q + 128 would saturate ``vpmaddubsw``'s int16 pairs). Signed nibbles are made
  unsigned by an offset (q + 8, q + 16) taken back once a group as ``-offset * d * dx * qsum``;
  Q4_1 / Q5_1's min enters as ``m * dx * qsum``, the sum of the block's dequantized activations.
  Blocks after the last whole group one at a time. Reference:
  ``weightstream.kernels.quantize.matmul_q8_ref``.
* ``_<type>_kernel`` (generic, any CPU): each row's blocks are dequantized exactly as
  ``weightstream.kernels.reference`` into a float32 buffer of up to 256 values, then dotted with float32
  activations. Reference: ``weightstream.kernels.reference.matmul_ref``.

The dense types only have the float path (F16 through ``vcvtph2ps``).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import binding as llvm, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..traits import TRAITS

F32 = np.float32
FASTMATH = {"reassoc", "contract", "nsz"}  # no 'arcp' / 'afn': no approximate division
JIT = dict(cache=True, nogil=True)
ROWS_PER_TASK = 16  # rows per prange task: buffers are allocated once per task

# ---------------------------------------------------------------------------
# Scalar helpers
# ---------------------------------------------------------------------------


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """uint16 bits of an IEEE binary16 -> float32, exact (LLVM fpext half: vcvtph2ps)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def round_f16(typingctx, v):
    """float32 -> nearest binary16 (ties to even) -> float32, as NumPy's astype(float16)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _u32_bits_to_f32(typingctx, u):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always")
def f16(wr, off):
    """The little-endian fp16 at byte `off` of the uint8 row `wr`, as float32."""
    return _f16_bits_to_f32(np.uint16(wr[off]) | (np.uint16(wr[off + 1]) << np.uint16(8)))


@njit(inline="always")
def dot_f32(buf, xr, xo, ne):
    s = F32(0.0)
    for k in range(ne):
        s += buf[k] * xr[xo + k]
    return s


# ---------------------------------------------------------------------------
# LLVM IR helpers for the SIMD intrinsics (AVX-512 BW / VNNI or AVX2; see ISA and matmul.SIMD_TIER)
# ---------------------------------------------------------------------------


def host_isa() -> str | None:
    """The instruction set the IR kernels are built for on this host: 'avx512' (AVX-512 BW/VL +
    VNNI: 64-byte k-quant products, vpdpbusd), 'avx2' (with FMA and F16C, e.g. AMD Zen 3: 32-byte
    products by vpmaddubsw + vpmaddwd) or None (only the generic tier can run)."""
    features = llvm.get_host_cpu_features()
    for isa, needs in (("avx512", ("avx2", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni")),
                       ("avx2", ("avx2", "fma", "f16c"))):
        if all(features.get(f, False) for f in needs):
            return isa
    return None


ISA = host_isa()

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FLT = ir.FloatType()


def vec(t, n):
    return ir.VectorType(t, n)


def splat(t, n, v):
    return ir.Constant(vec(t, n), [ir.Constant(t, v)] * n)


def c64(v):
    return ir.Constant(I64, v)


def arr(context, builder, aty, val):
    """(data pointer, [shape...]) of a Numba array argument."""
    a = context.make_array(aty)(context, builder, val)
    return a.data, cgutils.unpack_tuple(builder, a.shape, aty.ndim)


def vload(builder, base, off, vty):
    """Unaligned vector load of vty at element offset `off` of pointer `base`."""
    p = builder.gep(base, [off])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)


def call(builder, name, ret, argtys, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)
    return builder.call(fn, args)


# Bytes ahead of the weight block being read that a kernel prefetches (as the Cython kernels'
# WS_KQ_PREFETCH): one core's hardware prefetcher alone keeps too few lines in flight to stream
# weights at the memory's rate. Prefetching past the end of an array is harmless (no fault).
PREFETCH_BYTES = 4096


def prefetch(builder, base, byte_off, lines=1):
    """llvm.prefetch (read, keep in all levels) of `lines` cache lines at uint8 pointer
    base + byte_off + PREFETCH_BYTES."""
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32]),
                                        "llvm.prefetch.p0i8")
    for line in range(lines):
        p = builder.gep(base, [builder.add(byte_off, c64(PREFETCH_BYTES + 64 * line))])
        builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def bcast(builder, v, n):
    first = builder.insert_element(ir.Constant(vec(v.type, n), ir.Undefined), v, ir.Constant(I32, 0))
    return builder.shuffle_vector(first, first, ir.Constant(vec(I32, n), [0] * n))


def half_at(builder, base, off):
    """The fp16 weight scale at byte offset `off` of uint8 pointer `base`, as float, an Inf made
    NaN: the reference's dequantized block holds 0 * Inf = NaN (or sums Inf * x of both signs),
    so its outputs are NaN where the integer dots here would give +/-Inf (common.h ws_inf_to_nan).

    Converted in integer registers, not by fpext half: LLVM lowers that to vpinsrw into whatever
    xmm register it picks, often a float accumulator, so each block's scale waited for the last
    block's sums (Q4_1 4096x4096, n = 1, AVX2: ~21 cycles a block). Sign and exponent + mantissa
    moved to binary32's places, times 2^112 (the bias difference: exact for normal and subnormal
    halves), exponent 31 (Inf, NaN) -> NaN."""
    h = builder.zext(builder.load(builder.bitcast(builder.gep(base, [off]), I16.as_pointer()), align=1), I32)
    sign = builder.and_(builder.shl(h, ir.Constant(I32, 16)), ir.Constant(I32, 0x80000000))
    mag = builder.and_(builder.shl(h, ir.Constant(I32, 13)), ir.Constant(I32, 0x0FFFE000))
    v = builder.fmul(builder.bitcast(builder.or_(sign, mag), FLT), ir.Constant(FLT, 2.0 ** 112))
    special = builder.icmp_unsigned("==", builder.and_(h, ir.Constant(I32, 0x7C00)), ir.Constant(I32, 0x7C00))
    return builder.select(special, ir.Constant(FLT, float("nan")), v)


def hsum(builder, v):
    """Tree sum of the lanes of a float vector (a power-of-two width)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(I32, 0))


_MADD = {32: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
         64: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}


def madd(builder, u, s, sc):
    """int32 lanes of a 32- or 64-byte u8 x s8 product: adjacent products summed in int16
    (vpmaddubsw: saturates, so 2 * max(u) * 128 must stay below 2^15), then adjacent int16 sums
    times the int16 sc, summed in int32 (vpmaddwd)."""
    nb = u.type.count
    ub, wd = _MADD[nb]
    p = call(builder, ub, vec(I16, nb // 2), [vec(I8, nb)] * 2, [u, s])
    return call(builder, wd, vec(I32, nb // 4), [vec(I16, nb // 2)] * 2, [p, sc])


def dot_u8s8(builder, u, s):
    """<8 x i32>: sums of 4 products u8 x s8 of 32-byte u and s (one vpdpbusd on AVX-512 VNNI;
    AVX2: madd by int16 ones)."""
    if ISA == "avx512":
        return call(builder, "llvm.x86.avx512.vpdpbusd.256", vec(I32, 8), [vec(I32, 8), vec(I8, 32), vec(I8, 32)],
                    [splat(I32, 8, 0), u, s])
    return madd(builder, u, s, splat(I16, 16, 1))


def sign_i8(builder, x, q):
    """x where q > 0, -x where q < 0, 0 where q == 0, bytewise (vpsignb ymm)."""
    return call(builder, "llvm.x86.avx2.psign.b", vec(I8, 32), [vec(I8, 32)] * 2, [x, q])


def tile_rows(cols):
    """Activation rows per tile, a multiple of 4: the int8 tile stays in L2 (~256 KiB) while a
    task's rows reuse it."""
    return max(4, min(64, 262144 // max(cols, 1)) // 4 * 4)


# ---------------------------------------------------------------------------
# SIMD kernels (int8 activations)
# ---------------------------------------------------------------------------

# Q8_0's weights: |q| times the activations with q's signs (vpsignb), where q + 128 would saturate
# AVX2's vpmaddubsw (2 * 255 * 127 > 2^15 - 1); no offset, so no term to take back
# kind -> (block bytes, weight offset added to make it unsigned (0: has a min or is signed), has min)
_LEGACY = {kind: (TRAITS[T[kind.upper()]].block_bytes, offset, has_min) for kind, offset, has_min in (
    ("q4_0", 8, False), ("q4_1", 0, True), ("q5_0", 16, False), ("q5_1", 0, True), ("q8_0", 0, False))}
_QS_OFF = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8, "q8_0": 2}  # byte offset of a block's quants
_QH_OFF = {"q5_0": 2, "q5_1": 4}  # ... of its fifth bits (little-endian uint32: bit j is element j's)
GROUP = 8  # blocks whose fp16 scales are read and converted as one vector


def paired(kind) -> bool:
    """Whether the kernel reads kind's blocks two at a time, its activations in split order
    (see split_blocks): the nibble types (a pair's 32 qs bytes fill one register); Q8_0 fills one
    register a block."""
    return kind != "q8_0"


def split_blocks(kind, nb) -> int:
    """How many leading blocks of an nb-block activation row the SIMD kernel reads in split order:
    each pair of blocks A, B (in whole groups of GROUP) as A's elements 0..15, B's 0..15 in the
    first block's 32 bytes, A's 16..31, B's 16..31 in the second's, the order a pair's codes take
    in two registers (_pair_u8); their dx and qsum in SCALE_ORDER within each group. The blocks
    after them (and every Q8_0 block): natural order."""
    return nb // GROUP * GROUP if paired(kind) else 0


def _weights_u8(builder, pb, kind):
    """(<32 x i8> unsigned weights, d, m or None, signs or None) of the block at uint8 pointer pb;
    signs: the bytes whose signs the activations take on before the product (Q8_0)."""
    d = half_at(builder, pb, c64(0))
    m = half_at(builder, pb, c64(2)) if kind in ("q4_1", "q5_1") else None
    if kind == "q8_0":
        q = vload(builder, pb, c64(2), vec(I8, 32))
        return sign_i8(builder, q, q), d, m, q  # |q|: -128 becomes 128, right as unsigned
    qs = vload(builder, pb, c64(_QS_OFF[kind]), vec(I8, 16))
    # the 16 bytes in both halves (a broadcast load), the high half shifted down by 4 (one 32-bit
    # variable shift), then the low nibbles: elements 0..15, then 16..31, without the
    # lane-crossing concatenation of two halves (Zen 3 has one pipe for those)
    both = builder.shuffle_vector(qs, qs, ir.Constant(vec(I32, 32), list(range(16)) * 2))
    shifted = builder.lshr(builder.bitcast(both, vec(I32, 8)), ir.Constant(vec(I32, 8), [0] * 4 + [4] * 4))
    q = builder.and_(builder.bitcast(shifted, vec(I8, 32)), splat(I8, 32, 15))
    if kind in _QH_OFF:
        q = builder.or_(q, _fifth_bits(builder, _load_i32(builder, pb, _QH_OFF[kind])))
    return q, d, m, None


def _load_i32(builder, pb, off):
    return builder.load(builder.bitcast(builder.gep(pb, [c64(off)]), I32.as_pointer()), align=1)


def _fifth_bits(builder, h):
    """<32 x i8>: 16 where bit j of the i32 h is set, else 0."""
    return builder.shl(builder.zext(builder.bitcast(h, vec(I1, 32)), vec(I8, 32)), splat(I8, 32, 4))


def _pair_u8(builder, pa, kind):
    """(w0, w1): <32 x i8> unsigned codes of block A at uint8 pointer pa and block B after it, in
    split order: w0 holds elements 0..15 of A then of B (the qs bytes' low nibbles), w1 elements
    16..31 (high nibbles). Both blocks' qs from two 32-byte loads (from A's qs, and the 32 bytes
    that end with B's: both inside the pair for every type) and a blend, where a 128-bit insert
    would take Zen 3's one lane-crossing shuffle pipe."""
    nbytes, qo = _LEGACY[kind][0], _QS_OFF[kind]
    a = vload(builder, pa, c64(qo), vec(I8, 32))
    b = vload(builder, pa, c64(nbytes + qo - 16), vec(I8, 32))
    v = builder.shuffle_vector(a, b, ir.Constant(vec(I32, 32), list(range(16)) + list(range(48, 64))))
    m15 = splat(I8, 32, 15)
    w0 = builder.and_(v, m15)
    w1 = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, vec(I16, 16)), splat(I16, 16, 4)),
                                      vec(I8, 32)), m15)
    if kind in _QH_OFF and ISA == "avx512":
        # the 32 bits of each register's fifth bits as a mask register (kmovd): one masked op
        ha, hb = _load_i32(builder, pa, _QH_OFF[kind]), _load_i32(builder, pa, nbytes + _QH_OFF[kind])
        lo, hi = ir.Constant(I32, 0xFFFF), ir.Constant(I32, 0xFFFF0000)
        h0 = builder.or_(builder.and_(ha, lo), builder.shl(hb, ir.Constant(I32, 16)))   # elements 0..15
        h1 = builder.or_(builder.lshr(ha, ir.Constant(I32, 16)), builder.and_(hb, hi))  # 16..31
        w0 = builder.or_(w0, _fifth_bits(builder, h0))
        w1 = builder.or_(w1, _fifth_bits(builder, h1))
    elif kind in _QH_OFF:
        # AVX2: A's qh broadcast to the low 128 bits, B's to the high (two broadcast loads: load
        # ports only), then per half the lane's bytes 0, 1 (elements 0..15) or 2, 3 (16..31)
        # spread to 8 bytes each (one in-lane vpshufb), the element's bit tested: where the two
        # halves were joined in integer registers first, Q5_0 4096x4096 took ~10% longer (Zen 3)
        ha, hb = _load_i32(builder, pa, _QH_OFF[kind]), _load_i32(builder, pa, nbytes + _QH_OFF[kind])
        hv = builder.bitcast(builder.shuffle_vector(bcast(builder, ha, 4), bcast(builder, hb, 4),
                                                    ir.Constant(vec(I32, 8), [0, 1, 2, 3, 4, 5, 6, 7])), vec(I8, 32))
        bit = ir.Constant(vec(I8, 32), [1 << (j % 8) for j in range(32)])
        for half in (0, 1):
            spread = [16 * (j // 16) + 2 * half + (j % 16) // 8 for j in range(32)]
            b = builder.shuffle_vector(hv, hv, ir.Constant(vec(I32, 32), spread))
            hit = builder.icmp_unsigned("==", builder.and_(b, bit), bit)
            fifth = builder.select(hit, splat(I8, 32, 16), splat(I8, 32, 0))
            if half == 0:
                w0 = builder.or_(w0, fifth)
            else:
                w1 = builder.or_(w1, fifth)
    return w0, w1


def dot_pair(builder, w0, x0, w1, x1):
    """<8 x i32>: the u8 x s8 products of (w0, x0) and (w1, x1) summed in groups of 4; in split
    order lanes 0..3 sum to block A's dot, 4..7 to B's. AVX2: the two vpmaddubsw int16 sums added
    before widening (at most 2 * 2 * 31 * 127 = 15748: no saturation)."""
    if ISA == "avx512":
        sig = [vec(I32, 8), vec(I8, 32), vec(I8, 32)]
        t = call(builder, "llvm.x86.avx512.vpdpbusd.256", vec(I32, 8), sig, [splat(I32, 8, 0), w0, x0])
        return call(builder, "llvm.x86.avx512.vpdpbusd.256", vec(I32, 8), sig, [t, w1, x1])
    p0 = call(builder, _MADD[32][0], vec(I16, 16), [vec(I8, 32)] * 2, [w0, x0])
    p1 = call(builder, _MADD[32][0], vec(I16, 16), [vec(I8, 32)] * 2, [w1, x1])
    return call(builder, _MADD[32][1], vec(I32, 8), [vec(I16, 16)] * 2, [builder.add(p0, p1), splat(I16, 16, 1)])


def half_pair(builder, base, off):
    """The two fp16 scales at byte `off` of uint8 pointer `base` (a k-quant's d, dmin) as floats,
    Inf made NaN as half_at, by one 32-bit load and one vcvtph2ps: two half_at conversions were
    ~14 scalar operations a block, on the ports the vector work needs."""
    h = builder.bitcast(builder.load(builder.bitcast(builder.gep(base, [off]), I32.as_pointer()), align=1), vec(I16, 2))
    f = _halves(builder, h)
    return builder.extract_element(f, ir.Constant(I32, 0)), builder.extract_element(f, ir.Constant(I32, 1))


def _halves(builder, h):
    """<n x i16> fp16 bits -> <n x float> (vcvtph2ps), Inf made NaN as half_at."""
    n = h.type.count
    f = builder.fpext(builder.bitcast(h, vec(ir.HalfType(), n)), vec(FLT, n))
    special = builder.icmp_unsigned("==", builder.and_(h, splat(I16, n, 0x7C00)), splat(I16, n, 0x7C00))
    return builder.select(special, ir.Constant(vec(FLT, n), [float("nan")] * n), f)


# The order of a group's blocks in the kernels' scale vectors (S = d * dx and the activations' dx,
# qsum), paired types: even blocks in the low 128 bits, odd in the high, so that a pair's two
# scales, four lanes each, come from one in-lane shuffle (vpermilps: lane p of each half) where
# natural order needed a lane-crossing permute (Zen 3 has one pipe for those)
SCALE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def scales8(builder, pg, kind):
    """(d, m or None): <8 x float> of the GROUP blocks from uint8 pointer pg, Inf made NaN; paired
    types in SCALE_ORDER, Q8_0 in block order.

    Each block's first 4 bytes (d, and m where the type has one) by a 32-bit load into an xmm,
    joined by a tree of 128-bit unpacks and one byte shuffle (d's halves, then m's), converted by
    vcvtph2ps: element inserts (vpinsrw) made a serial chain of 8 per vector."""
    nbytes, _, has_min = _LEGACY[kind]
    v4 = vec(I32, 4)
    words = []
    for j in (SCALE_ORDER if paired(kind) else range(GROUP)):
        w = _load_i32(builder, pg, j * nbytes)
        words.append(builder.insert_element(ir.Constant(v4, ir.Undefined), w, ir.Constant(I32, 0)))
    # [w0 w1 . .], [w2 w3 . .] -> [w0 w1 w2 w3] (vpunpckldq, vpunpcklqdq)
    pairs = [builder.shuffle_vector(words[2 * i], words[2 * i + 1], ir.Constant(v4, [0, 4, 1, 5]))
             for i in range(4)]
    quads = [builder.shuffle_vector(pairs[2 * i], pairs[2 * i + 1], ir.Constant(v4, [0, 1, 4, 5]))
             for i in range(2)]
    lo, hi = (builder.bitcast(q, vec(I16, 8)) for q in quads)  # halves: d0 m0 d1 m1 ... of 4 blocks each
    d = builder.shuffle_vector(lo, hi, ir.Constant(vec(I32, 8), [0, 2, 4, 6, 8, 10, 12, 14]))
    if not has_min:
        return _halves(builder, d), None
    m = builder.shuffle_vector(lo, hi, ir.Constant(vec(I32, 8), [1, 3, 5, 7, 9, 11, 13, 15]))
    return _halves(builder, d), _halves(builder, m)


def scale_lanes(kind, j):
    """The lanes of a group's scale vector that block j (paired: blocks j, j + 1) of the group
    multiply: Q8_0 block j's 8 lanes; a pair's lanes 0..3 block j, 4..7 block j + 1 (dot_pair),
    from lane j / 2 of each half (SCALE_ORDER)."""
    if not paired(kind):
        return [j] * 8
    return [j // 2] * 4 + [4 + j // 2] * 4


def fma(builder, a, b, c):
    """a * b + c, fused (llvm.fma on float vectors of any width)."""
    vt = a.type
    return call(builder, f"llvm.fma.v{vt.count}f32", vt, [vt] * 3, [a, b, c])


def _make_legacy_rows(kind, K):
    """An intrinsic computing out[i0 + k, r] for k < K (K activation rows at once, each with
    float accumulators kept in registers).

    Blocks in groups of GROUP: the group's fp16 d (and m) converted as one vector, times the
    rows' 8 dx (S = d * dx); the offset / min term once a group (Q4_0, Q5_0: -offset * S * qsum;
    Q4_1, Q5_1: m * dx * qsum, the sum of the blocks' dequantized activations); then per pair
    of blocks (Q8_0: per block) one int8 product per row, its lanes scaled by their blocks' S
    (one lane permute) in an FMA. The blocks after the last whole group one at a time as the
    scalar scale, the offset taken back exactly in int32."""
    nbytes, offset, has_min = _LEGACY[kind]
    step = 2 if paired(kind) else 1
    lines = -(-GROUP * nbytes // 64)  # cache lines of a group's blocks
    n_acc = 2 if K == 1 else 1  # a second FMA chain where one row alone would wait on one

    @intrinsic
    def rows_dot(typingctx, wr, xq, xd, qsum, out, r, i0):
        """Activations: xq int8[nb, n, 32] (block-major; split order: split_blocks), xd
        float32[n, nb], qsum int32[n, nb]."""
        sig = types.void(wr, xq, xd, qsum, out, r, i0)

        def codegen(context, builder, signature, args):
            tys = signature.args
            pw, _ = arr(context, builder, tys[0], args[0])
            px, (nb, n, _) = arr(context, builder, tys[1], args[1])
            pxd, _ = arr(context, builder, tys[2], args[2])
            pqs, _ = arr(context, builder, tys[3], args[3])
            pout, (_, rows) = arr(context, builder, tys[4], args[4])
            r_, i0_ = args[5], args[6]
            v8f, v8i = vec(FLT, 8), vec(I32, 8)
            zf, zi = ir.Constant(v8f, [ir.Constant(FLT, 0.0)] * 8), ir.Constant(v8i, [ir.Constant(I32, 0)] * 8)
            accs = [[cgutils.alloca_once_value(builder, zf) for _ in range(n_acc)] for _ in range(K)]
            acc_terms = [cgutils.alloca_once_value(builder, zf) for _ in range(K)]  # offset / min terms
            xrow = [builder.mul(builder.add(i0_, c64(k)), nb) for k in range(K)]  # row k in [n, nb]
            ngroups = builder.sdiv(nb, c64(GROUP))
            with cgutils.for_range(builder, ngroups) as lg:
                b0 = builder.mul(lg.index, c64(GROUP))
                pg = builder.gep(pw, [builder.mul(b0, c64(nbytes))])
                prefetch(builder, pw, builder.mul(b0, c64(nbytes)), lines)
                d8, m8 = scales8(builder, pg, kind)
                S = []
                for k in range(K):
                    dx8 = vload(builder, pxd, builder.add(xrow[k], b0), v8f)
                    S.append(builder.fmul(d8, dx8))
                    if offset or has_min:
                        qf = builder.sitofp(vload(builder, pqs, builder.add(xrow[k], b0), v8i), v8f)
                        c = builder.fmul(m8, dx8) if has_min else builder.fmul(S[k], splat(FLT, 8, -float(offset)))
                        builder.store(fma(builder, c, qf, builder.load(acc_terms[k])), acc_terms[k])
                for j in range(0, GROUP, step):
                    pb = builder.gep(pg, [c64(j * nbytes)])
                    if step == 2:
                        w0, w1 = _pair_u8(builder, pb, kind)
                    else:
                        q = vload(builder, pb, c64(_QS_OFF[kind]), vec(I8, 32))
                        wa = sign_i8(builder, q, q)
                    lanes = ir.Constant(vec(I32, 8), scale_lanes(kind, j))
                    for k in range(K):
                        ib = builder.add(builder.mul(builder.add(b0, c64(j)), n), builder.add(i0_, c64(k)))
                        x0 = vload(builder, px, builder.mul(ib, c64(32)), vec(I8, 32))
                        if step == 2:
                            x1 = vload(builder, px, builder.mul(builder.add(ib, n), c64(32)), vec(I8, 32))
                            s = dot_pair(builder, w0, x0, w1, x1)
                        else:
                            s = dot_u8s8(builder, wa, sign_i8(builder, x0, q))
                        acc = accs[k][(j // step) % n_acc]
                        sc = builder.shuffle_vector(S[k], S[k], lanes)
                        builder.store(fma(builder, builder.sitofp(s, v8f), sc, builder.load(acc)), acc)
            b_tail = builder.mul(ngroups, c64(GROUP))
            with cgutils.for_range(builder, builder.sub(nb, b_tail)) as lb:
                b = builder.add(b_tail, lb.index)
                wq, d, m, signs = _weights_u8(builder, builder.gep(pw, [builder.mul(b, c64(nbytes))]), kind)
                for k in range(K):
                    ib = builder.add(builder.mul(b, n), builder.add(i0_, c64(k)))
                    x = vload(builder, px, builder.mul(ib, c64(32)), vec(I8, 32))
                    s = dot_u8s8(builder, wq, x if signs is None else sign_i8(builder, x, signs))
                    qsum = builder.load(builder.gep(pqs, [builder.add(xrow[k], b)]))
                    if offset:  # take the unsigned offset back, exactly: sum (q + c) x - c sum x
                        s = builder.sub(s, builder.insert_element(
                            zi, builder.mul(qsum, ir.Constant(I32, offset)), ir.Constant(I32, 0)))
                    dx = builder.load(builder.gep(pxd, [builder.add(xrow[k], b)]))
                    t = builder.fmul(builder.sitofp(s, v8f), bcast(builder, builder.fmul(d, dx), 8))
                    if has_min:  # m * (sum of the block's dequantized activations) = m * dx * qsum
                        mt = builder.fmul(builder.fmul(m, dx), builder.sitofp(qsum, FLT))
                        t = builder.fadd(t, builder.insert_element(zf, mt, ir.Constant(I32, 0)))
                    builder.store(builder.fadd(builder.load(acc_terms[k]), t), acc_terms[k])
            for k in range(K):
                total = builder.load(acc_terms[k])
                for acc in accs[k]:
                    total = builder.fadd(total, builder.load(acc))
                i = builder.add(i0_, c64(k))
                builder.store(hsum(builder, total), builder.gep(pout, [builder.add(builder.mul(i, rows), r_)]))
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


_ROWS4 = {k: _make_legacy_rows(k, 4) for k in _LEGACY}
_ROWS1 = {k: _make_legacy_rows(k, 1) for k in _LEGACY}
_q4_0_rows4, _q4_0_rows1 = _ROWS4["q4_0"], _ROWS1["q4_0"]
_q4_1_rows4, _q4_1_rows1 = _ROWS4["q4_1"], _ROWS1["q4_1"]
_q5_0_rows4, _q5_0_rows1 = _ROWS4["q5_0"], _ROWS1["q5_0"]
_q5_1_rows4, _q5_1_rows1 = _ROWS4["q5_1"], _ROWS1["q5_1"]
_q8_0_rows4, _q8_0_rows1 = _ROWS4["q8_0"], _ROWS1["q8_0"]


@njit(inline="always")
def _simd_rows(kind, xq, xd, qsum, w, out, task, nt):
    """Rows of one task against all activation rows, a tile of nt (a multiple of 4) at a time:
    the tile stays in L2 while the task's rows (also in L2) stream past it in groups of 4."""
    n = xq.shape[1]
    r0 = task * ROWS_PER_TASK
    r1 = min(w.shape[0], r0 + ROWS_PER_TASK)
    for t0 in range(0, n, nt):
        t1 = min(n, t0 + nt)
        for r in range(r0, r1):
            wr = w[r]
            i = t0
            while i + 4 <= t1:
                if kind == 0:
                    _q4_0_rows4(wr, xq, xd, qsum, out, r, i)
                elif kind == 1:
                    _q4_1_rows4(wr, xq, xd, qsum, out, r, i)
                elif kind == 2:
                    _q5_0_rows4(wr, xq, xd, qsum, out, r, i)
                elif kind == 3:
                    _q5_1_rows4(wr, xq, xd, qsum, out, r, i)
                else:
                    _q8_0_rows4(wr, xq, xd, qsum, out, r, i)
                i += 4
            while i < t1:
                if kind == 0:
                    _q4_0_rows1(wr, xq, xd, qsum, out, r, i)
                elif kind == 1:
                    _q4_1_rows1(wr, xq, xd, qsum, out, r, i)
                elif kind == 2:
                    _q5_0_rows1(wr, xq, xd, qsum, out, r, i)
                elif kind == 3:
                    _q5_1_rows1(wr, xq, xd, qsum, out, r, i)
                else:
                    _q8_0_rows1(wr, xq, xd, qsum, out, r, i)
                i += 1


# One cached kernel per type (the `kind` constant is folded after inlining).
@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_0_simd_kernel(xq, xd, qsum, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _simd_rows(0, xq, xd, qsum, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _simd_rows(0, xq, xd, qsum, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_1_simd_kernel(xq, xd, qsum, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _simd_rows(1, xq, xd, qsum, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _simd_rows(1, xq, xd, qsum, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_0_simd_kernel(xq, xd, qsum, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _simd_rows(2, xq, xd, qsum, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _simd_rows(2, xq, xd, qsum, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_1_simd_kernel(xq, xd, qsum, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _simd_rows(3, xq, xd, qsum, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _simd_rows(3, xq, xd, qsum, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q8_0_simd_kernel(xq, xd, qsum, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _simd_rows(4, xq, xd, qsum, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _simd_rows(4, xq, xd, qsum, w, out, task, nt)


# ---------------------------------------------------------------------------
# Generic kernels (float activations): exact dequantization of up to 8 blocks, then a float dot
# ---------------------------------------------------------------------------


@njit(inline="always")
def _deq_block(kind, wr, o, fbuf, p):
    """Dequantize the block at byte `o` of row `wr` into fbuf[p:p + 32] as weightstream.kernels.reference."""
    if kind == 0:  # Q4_0: (nibble - 8) * d
        d = f16(wr, o)
        for l in range(16):
            q = wr[o + 2 + l]
            fbuf[p + l] = F32(np.int32(q & 15) - 8) * d
            fbuf[p + 16 + l] = F32(np.int32(q >> 4) - 8) * d
    elif kind == 1:  # Q4_1: nibble * d + m
        d = f16(wr, o)
        m = f16(wr, o + 2)
        for l in range(16):
            q = wr[o + 4 + l]
            fbuf[p + l] = F32(q & 15) * d + m
            fbuf[p + 16 + l] = F32(q >> 4) * d + m
    elif kind == 2:  # Q5_0: ((nibble | fifth bit << 4) - 16) * d
        d = f16(wr, o)
        for l in range(16):
            q = wr[o + 6 + l]
            h0 = (wr[o + 2 + (l >> 3)] >> (l & 7)) & 1
            h1 = (wr[o + 4 + (l >> 3)] >> (l & 7)) & 1
            fbuf[p + l] = F32(np.int32((q & 15) | (h0 << 4)) - 16) * d
            fbuf[p + 16 + l] = F32(np.int32((q >> 4) | (h1 << 4)) - 16) * d
    elif kind == 3:  # Q5_1: (nibble | fifth bit << 4) * d + m
        d = f16(wr, o)
        m = f16(wr, o + 2)
        for l in range(16):
            q = wr[o + 8 + l]
            h0 = (wr[o + 4 + (l >> 3)] >> (l & 7)) & 1
            h1 = (wr[o + 6 + (l >> 3)] >> (l & 7)) & 1
            fbuf[p + l] = F32((q & 15) | (h0 << 4)) * d + m
            fbuf[p + 16 + l] = F32((q >> 4) | (h1 << 4)) * d + m
    else:  # Q8_0: q * d
        d = f16(wr, o)
        for l in range(32):
            fbuf[p + l] = F32(np.int8(wr[o + 2 + l])) * d


@njit(inline="always")
def _generic_rows(kind, bbytes, x, w, out, task, fbuf, acc):
    n = x.shape[0]
    nb = x.shape[1] // 32
    r0 = task * ROWS_PER_TASK
    for r in range(r0, min(w.shape[0], r0 + ROWS_PER_TASK)):
        wr = w[r]
        acc[:] = 0
        for c0 in range(0, nb, 8):
            nbl = min(8, nb - c0)
            for bl in range(nbl):
                _deq_block(kind, wr, bbytes * (c0 + bl), fbuf, 32 * bl)
            for i in range(n):
                acc[i] += dot_f32(fbuf, x[i], 32 * c0, 32 * nbl)
        for i in range(n):
            out[i, r] = acc[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_0_kernel(x, w, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _generic_rows(0, 18, x, w, out, task, np.empty(256, np.float32), np.empty(x.shape[0], np.float32))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_1_kernel(x, w, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _generic_rows(1, 20, x, w, out, task, np.empty(256, np.float32), np.empty(x.shape[0], np.float32))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_0_kernel(x, w, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _generic_rows(2, 22, x, w, out, task, np.empty(256, np.float32), np.empty(x.shape[0], np.float32))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_1_kernel(x, w, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _generic_rows(3, 24, x, w, out, task, np.empty(256, np.float32), np.empty(x.shape[0], np.float32))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q8_0_kernel(x, w, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _generic_rows(4, 34, x, w, out, task, np.empty(256, np.float32), np.empty(x.shape[0], np.float32))


@njit(inline="always")
def _deq_dense(kind, wr, e0, ne, fbuf):
    if kind == 0:  # F32: little-endian bytes
        for k in range(ne):
            p = 4 * (e0 + k)
            bits = (np.uint32(wr[p]) | (np.uint32(wr[p + 1]) << np.uint32(8))
                    | (np.uint32(wr[p + 2]) << np.uint32(16)) | (np.uint32(wr[p + 3]) << np.uint32(24)))
            fbuf[k] = _u32_bits_to_f32(bits)
    elif kind == 1:  # F16
        for k in range(ne):
            fbuf[k] = f16(wr, 2 * (e0 + k))
    else:  # BF16: the top half of a binary32
        for k in range(ne):
            p = 2 * (e0 + k)
            fbuf[k] = _u32_bits_to_f32((np.uint32(wr[p]) << np.uint32(16)) | (np.uint32(wr[p + 1]) << np.uint32(24)))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _dense_kernel(kind, x, w, out):
    n, cols = x.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        fbuf = np.empty(256, np.float32)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for e0 in range(0, cols, 256):
                ne = min(256, cols - e0)
                _deq_dense(kind, wr, e0, ne, fbuf)
                for i in range(n):
                    acc[i] += dot_f32(fbuf, x[i], e0, ne)
            for i in range(n):
                out[i, r] = acc[i]


SIMD_KERNELS = {"Q4_0": _q4_0_simd_kernel, "Q4_1": _q4_1_simd_kernel, "Q5_0": _q5_0_simd_kernel,
                "Q5_1": _q5_1_simd_kernel, "Q8_0": _q8_0_simd_kernel}
GENERIC_KERNELS = {"Q4_0": _q4_0_kernel, "Q4_1": _q4_1_kernel, "Q5_0": _q5_0_kernel,
                   "Q5_1": _q5_1_kernel, "Q8_0": _q8_0_kernel}
DENSE_KIND = {"F32": 0, "F16": 1, "BF16": 2}
