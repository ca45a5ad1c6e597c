"""Numba kernels for the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), Q8_K activations.

Used through ``weightstream.kernels.numba.matmul.matmul_into``; everything here trusts its inputs.
Activations arrive quantized as ``weightstream.kernels.quantize.quantize_q8_k`` does (bit for bit): quants,
one float scale ``xd`` per 256 values and ``bsums``, the sums of each 16 quants, through which
the weights' mins are applied once per sub-block. Reference: ``weightstream.kernels.quantize.matmul_q8_ref``.

Two tiers:

* ``_q2_k_simd_kernel`` .. ``_q6_k_simd_kernel`` (AVX-512 BW, or AVX2: ``legacy.ISA``), the
  Cython kernels' scheme (kernels/csrc/kquants_simd.h): each super-block is unpacked once into
  four 64-byte planes of unsigned codes q' (Q2_K q, Q3_K q + 4, Q4_K nibble, Q5_K nibble | hbit
  << 4, Q6_K q + 32) and four int16 vectors of sub-block scales; then per activation row and
  plane ``vpmaddubsw`` (u8 x s8 -> pairs summed in int16, no saturation: 2 * 63 * 128 < 2^15) and
  ``vpmaddwd`` with the scales (int16 pairs -> int32), on the whole plane (AVX-512) or on its two
  32-byte halves (AVX2, ``KQ_WIDTH``: the unpacking IR is the same, LLVM splits its 64-byte
  vectors into ymm pairs); the int32 lanes are turned to float and scaled by ``d * xd`` into 16
  (AVX2: 8) float lanes per activation row, reduced once per row. The codes' offset (Q3_K, Q6_K)
  is taken back exactly in int32 and the mins (Q2_K, Q4_K, Q5_K) in float, both through the
  activations' bsums. Q2_K on CPUs with VBMI skips the int16 scales: its codes come out already
  times their scales from a vpermb table and one ``vpdpbusd`` per plane does the rest, as the
  Cython kernel. Activation quants are stored permuted per type (``PERM_Q2_K`` = ``PERM_Q3_K``,
  ``PERM_Q4_K`` = ``PERM_Q5_K``; Q6_K natural order) so that plane j meets them in order and
  every plane is a uniform shift of contiguous bytes. One ``@intrinsic`` per type
  (``_make_kq_rows``): up to ``KQ_ROWS_MAX`` activation rows per call, accumulators in registers.
  Written as explicit LLVM vector IR (LLVM does not vectorise the unpack of 16-element
  sub-blocks from plain loops: measured 30x slower).
* ``_q*_k_kernel`` (generic, any CPU; the fallback without AVX-512 or AVX2): each super-block is
  unpacked once into an int16 buffer with its sub-block scales folded in (``sc * q``) and dotted in int32 with every activation row
  (LLVM emits ``vpdpwssd`` for that loop); one float multiply-add per block and row.
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .legacy import (F32, FASTMATH, FLT, I8, I16, I32, ISA, JIT, ROWS_PER_TASK, arr, bcast, c64, prefetch,
                     call, f16, fma, half_at, half_pair, hsum, madd, splat, vec, vload)


@njit(inline="always")
def scale16(wr, off):
    """A weight scale (fp16 d / dmin at byte `off` of row `wr`) with an Inf made NaN: the
    reference's dequantized block holds 0 * Inf = NaN where a quant is 0, so its outputs are NaN;
    the int16 dots here would give +/-Inf. np.isinf, not (s - s) + s: the kernels' fastmath
    'reassoc' + 'nsz' may fold that to s."""
    s = f16(wr, off)
    return F32(np.nan) if np.isinf(s) else s


@njit(inline="always")
def _dot_i16_256(buf, xr, xo):
    """int32 sum of buf[k] * xr[xo + k], k < 256 (int16 x int16 -> vpdpwssd)."""
    isum = np.int32(0)
    for k in range(256):
        isum = np.int32(isum + np.int32(buf[k]) * np.int32(xr[xo + k]))
    return isum


# ---------------------------------------------------------------------------
# k-quant unpackers: one 256-weight super-block at byte `o` of row `wr` -> int16 sc * q in
# buf[256], mins in mins[16] (Q2_K) / mins[8] (Q4_K, Q5_K). Layouts: kernels/formats.py.
# ---------------------------------------------------------------------------


@njit(inline="always")
def _unpack_q2_k(wr, o, buf, mins):
    # element 16 s + l (s = 8 h + 2 j + half) is bits 2j.. of qs[32 h + 16 half + l]
    for s in range(16):
        sc = np.int16(wr[o + s] & 15)
        mins[s] = np.int32(wr[o + s] >> 4)
        qo = o + 16 + 32 * (s >> 3) + 16 * (s & 1)
        shift = 2 * ((s >> 1) & 3)
        for l in range(16):
            buf[16 * s + l] = np.int16((wr[qo + l] >> shift) & 3) * sc


@njit(inline="always")
def _unpack_q3_k(wr, o, buf):
    # hmask[32] @0, qs[64] @32, scales[12] @96, d @108
    for s in range(16):
        if s < 8:
            low = np.int32(wr[o + 96 + s]) & 15
        else:
            low = np.int32(wr[o + 96 + s - 8]) >> 4
        high = (np.int32(wr[o + 104 + (s & 3)]) >> (2 * (s >> 2))) & 3
        sc = np.int16((low | (high << 4)) - 32)
        h = s >> 3
        j = (s >> 1) & 3
        lo = 16 * (s & 1)
        for l in range(16):
            q2 = np.int16((wr[o + 32 + 32 * h + lo + l] >> (2 * j)) & 3)
            hb = np.int16((wr[o + lo + l] >> (4 * h + j)) & 1)
            buf[16 * s + l] = (q2 - np.int16(4) + np.int16(4) * hb) * sc


@njit(inline="always")
def _k4_scale_min(wr, p, j):
    """get_scale_min_k4: 6-bit scale and min j of the 12 packed bytes at wr[p:]."""
    if j < 4:
        return np.int16(wr[p + j] & 63), np.int32(wr[p + j + 4] & 63)
    sc = (wr[p + j + 4] & 15) | ((wr[p + j - 4] >> 6) << 4)
    m = (wr[p + j + 4] >> 4) | ((wr[p + j] >> 6) << 4)
    return np.int16(sc), np.int32(m)


@njit(inline="always")
def _unpack_q4_k(wr, o, buf, mins):
    # d @0, dmin @2, scales[12] @4, qs[128] @16; element 32 s + l: nibble s & 1 of qs[32 (s >> 1) + l]
    for s in range(8):
        sc, m = _k4_scale_min(wr, o + 4, s)
        mins[s] = m
        qo = o + 16 + 32 * (s >> 1)
        shift = 4 * (s & 1)
        for l in range(32):
            buf[32 * s + l] = np.int16((wr[qo + l] >> shift) & 15) * sc


@njit(inline="always")
def _unpack_q5_k(wr, o, buf, mins):
    # d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48; fifth bit of 32 s + l: bit s of qh[l]
    for s in range(8):
        sc, m = _k4_scale_min(wr, o + 4, s)
        mins[s] = m
        qo = o + 48 + 32 * (s >> 1)
        shift = 4 * (s & 1)
        for l in range(32):
            q = ((wr[qo + l] >> shift) & 15) | (((wr[o + 16 + l] >> s) & 1) << 4)
            buf[32 * s + l] = np.int16(q) * sc


@njit(inline="always")
def _unpack_q6_k(wr, o, buf):
    # ql[128] @0, qh[64] @128, scales int8[16] @192, d @208;
    # element 128 h + 32 k + l: nibble k >> 1 of ql[64 h + 32 (k & 1) + l], bits 2k of qh[32 h + l]
    for s in range(16):
        sc = np.int16(np.int8(wr[o + 192 + s]))
        h = s >> 3
        k = (s >> 1) & 3
        lo = 16 * (s & 1)
        qlo = o + 64 * h + 32 * (k & 1) + lo
        qho = o + 128 + 32 * h + lo
        for l in range(16):
            q = ((wr[qlo + l] >> (4 * (k >> 1))) & 15) | (((wr[qho + l] >> (2 * k)) & 3) << 4)
            buf[16 * s + l] = (np.int16(q) - np.int16(32)) * sc


# ---------------------------------------------------------------------------
# k-quant kernels (Q8_K activations: xq int16[n, cols], xd float32[n, nb], bsums int32[n, cols//16])
# ---------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q2_k_kernel(xq, xd, bsums, w, out):
    nb, n, _ = xq.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(256, np.int16)
        mins = np.empty(16, np.int32)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for b in range(nb):
                o = 84 * b
                _unpack_q2_k(wr, o, buf, mins)
                d = scale16(wr, o + 80)
                dmin = scale16(wr, o + 82)
                for i in range(n):
                    isum = _dot_i16_256(buf, xq[b, i], 0)
                    summs = np.int32(0)
                    for s in range(16):
                        summs = np.int32(summs + mins[s] * bsums[b, i, s])
                    acc[i] += xd[b, i] * (d * F32(isum) - dmin * F32(summs))
            for i in range(n):
                out[i, r] = acc[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q3_k_kernel(xq, xd, bsums, w, out):
    nb, n, _ = xq.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(256, np.int16)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for b in range(nb):
                o = 110 * b
                _unpack_q3_k(wr, o, buf)
                d = scale16(wr, o + 108)
                for i in range(n):
                    isum = _dot_i16_256(buf, xq[b, i], 0)
                    acc[i] += xd[b, i] * d * F32(isum)
            for i in range(n):
                out[i, r] = acc[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_k_kernel(xq, xd, bsums, w, out):
    nb, n, _ = xq.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(256, np.int16)
        mins = np.empty(8, np.int32)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for b in range(nb):
                o = 144 * b
                _unpack_q4_k(wr, o, buf, mins)
                d = scale16(wr, o)
                dmin = scale16(wr, o + 2)
                for i in range(n):
                    isum = _dot_i16_256(buf, xq[b, i], 0)
                    summs = np.int32(0)
                    for s in range(8):
                        bs = np.int32(bsums[b, i, 2 * s]) + np.int32(bsums[b, i, 2 * s + 1])
                        summs = np.int32(summs + mins[s] * bs)
                    acc[i] += xd[b, i] * (d * F32(isum) - dmin * F32(summs))
            for i in range(n):
                out[i, r] = acc[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_k_kernel(xq, xd, bsums, w, out):
    nb, n, _ = xq.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(256, np.int16)
        mins = np.empty(8, np.int32)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for b in range(nb):
                o = 176 * b
                _unpack_q5_k(wr, o, buf, mins)
                d = scale16(wr, o)
                dmin = scale16(wr, o + 2)
                for i in range(n):
                    isum = _dot_i16_256(buf, xq[b, i], 0)
                    summs = np.int32(0)
                    for s in range(8):
                        bs = np.int32(bsums[b, i, 2 * s]) + np.int32(bsums[b, i, 2 * s + 1])
                        summs = np.int32(summs + mins[s] * bs)
                    acc[i] += xd[b, i] * (d * F32(isum) - dmin * F32(summs))
            for i in range(n):
                out[i, r] = acc[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q6_k_kernel(xq, xd, bsums, w, out):
    nb, n, _ = xq.shape
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(256, np.int16)
        acc = np.empty(n, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            wr = w[r]
            acc[:] = 0
            for b in range(nb):
                o = 210 * b
                _unpack_q6_k(wr, o, buf)
                d = scale16(wr, o + 208)
                for i in range(n):
                    isum = _dot_i16_256(buf, xq[b, i], 0)
                    acc[i] += xd[b, i] * d * F32(isum)
            for i in range(n):
                out[i, r] = acc[i]



# ---------------------------------------------------------------------------
# SIMD kernels (AVX-512 BW or AVX2): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
# ---------------------------------------------------------------------------
#
# Same scheme as the Cython kernels (kernels/csrc/kquants_simd.h): every weight is turned into an
# unsigned code q' (so that vpmaddubsw, u8 x s8, can multiply it with the int8 activations), four
# 64-byte planes per 256-weight super-block, each plane times 64 activation bytes by vpmaddubsw
# (no saturation: q' <= 63, 2 * 63 * 128 < 2^15), then times the int16 sub-block scale of each
# int16 lane by vpmaddwd. What the unsigned code adds is taken back per super-block, through the
# activations' bsums (sums of each 16 quants, in natural element order whatever the permutation):
#
#     Q2_K: q' = q (0..3),       sc = low nibble, min = high nibble: acc -= dmin * dx * sum_k m_k bsum_k
#     Q3_K: q' = q + 4 (0..7),   sc = 6-bit - 32: isum -= 4 * sum_k sc_k bsum_k   (exact, int32)
#     Q6_K: q' = q + 32 (0..63), sc = int8:        isum -= 32 * sum_k sc_k bsum_k  (exact, int32)
#     Q4_K: q' = nibble, Q5_K: q' = nibble | hbit << 4, sc = 6-bit; min m per 32:
#           acc -= dmin * dx * sum_k m_k bsum_k                                    (float)
#
# Planes are chosen so that each is made with uniform shifts of contiguous bytes where possible;
# the activation quants are stored permuted (PERM_*) so that plane j meets them in order. Every
# PERM keeps runs of 32 elements in natural order, so AVX2's 32-byte halves of a plane meet
# 32 contiguous activations with the same permutation.

# Activation order within a super-block for the SIMD Q2_K kernel: position 64 j + l holds element
# 128 (l // 32) + 32 j + l % 32, i.e. the element that bits 2j..2j+1 of qs[l] belong to.
PERM_Q2_K = np.array([128 * (l // 32) + 32 * j + l % 32 for j in range(4) for l in range(64)], np.int64)
# Q3_K: plane j byte 32h + l = bits 2j of qs[32h + l] = element 128h + 32j + l: Q2_K's order.
PERM_Q3_K = PERM_Q2_K
# Q4_K / Q5_K: plane 2p + nib byte l = nibble nib of qs[64p + l] = element 64(2p + l // 32) + 32 nib + l % 32.
PERM_Q4_K = np.array([64 * (2 * p + l // 32) + 32 * nib + l % 32
                      for p in range(2) for nib in range(2) for l in range(64)], np.int64)
PERM_Q5_K = PERM_Q4_K
# Q6_K: plane 2h + nib byte m = nibble nib of ql[64h + m] = element 128h + 64nib + m: natural order.
PERM_Q6_K = None


def _i32_at(builder, base, off):
    """The little-endian uint32 at byte offset `off` of uint8 pointer `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [c64(off)]), I32.as_pointer()), align=1)


def _words_to_bytes(builder, words):
    """Four i32 values -> <16 x i8> (little-endian bytes of each in turn)."""
    v = ir.Constant(vec(I32, 4), ir.Undefined)
    for k, wv in enumerate(words):
        v = builder.insert_element(v, wv, ir.Constant(I32, k))
    return builder.bitcast(v, vec(I8, 16))


def _i8c(v):
    """An i8 constant from a byte value 0..255 (LLVM wants it signed)."""
    return ir.Constant(I8, v - 256 if v >= 128 else v)


def _bytes(vals):
    return ir.Constant(vec(I8, len(vals)), [_i8c(v) for v in vals])


def _dup32(builder, v32):
    """<32 x i8> -> <64 x i8>, the 32 bytes twice (a 256-bit broadcast)."""
    return builder.shuffle_vector(v32, v32, ir.Constant(vec(I32, 64), list(range(32)) * 2))


def _lanes16(builder, sc16, subs):
    """<32 x i16> whose int16 lane t holds sc16[subs[t // 8]] (4 sub-blocks, 8 lanes each)."""
    return builder.shuffle_vector(sc16, sc16, ir.Constant(vec(I32, 32), [s for s in subs for _ in range(8)]))


def _nibble(builder, q, nib):
    v = q if nib == 0 else builder.lshr(q, splat(I8, 64, 4))
    return builder.and_(v, splat(I8, 64, 15))


def _bit_add(builder, q, bits, masks, value):
    """q + value where (bits & masks) != 0, bytewise (vptestmb + masked add)."""
    on = builder.icmp_unsigned("!=", builder.and_(bits, _bytes(masks)), splat(I8, 64, 0))
    return builder.add(q, builder.select(on, splat(I8, 64, value), splat(I8, 64, 0)))


def _unpack_q2_k_simd(builder, pb):
    """scales[16] @0 (low nibble scale, high nibble min), qs[64] @16, d @80, dmin @82."""
    scales = vload(builder, pb, c64(0), vec(I8, 16))
    sc16 = builder.zext(builder.and_(scales, splat(I8, 16, 15)), vec(I16, 16))
    mins16 = builder.zext(builder.lshr(scales, splat(I8, 16, 4)), vec(I16, 16))
    qs = vload(builder, pb, c64(16), vec(I8, 64))
    planes, plane_scales = [], []
    for j in range(4):
        planes.append(builder.and_(builder.lshr(qs, splat(I8, 64, 2 * j)), splat(I8, 64, 3)))
        plane_scales.append(_lanes16(builder, sc16, [2 * j, 2 * j + 1, 8 + 2 * j, 9 + 2 * j]))
    d, dmin = half_pair(builder, pb, c64(80))
    return planes, plane_scales, d, mins16, dmin, 0


# Q2_K's weights come out already times their sub-block scales, as in the Cython kernel
# (kernels/csrc/kquants_simd.h, ws_unpack_q2k, where the layout is explained): a 64-entry byte
# table T[index] = q * sc[sub-block] made from the 16 scale bytes by one constant byte shuffle,
# a nibble mask and two masked doublings, looked up with vpermb at index (code bits & mask) | base;
# then one vpdpbusd per plane, where vpmaddubsw + vpmaddwd with spread int16 scales took two
# multiplies and four shuffles more (numba / cython, 14336x4096, n = 1, 1 thread: 1.50 -> 1.31).
_Q2K_PERM = [0, 0, 0, 0, 2, 3, 10, 11, 2, 3, 10, 11, 2, 3, 10, 11, 4, 5, 12, 13, 0, 0, 0, 0, 0, 1, 1, 1,
             0, 8, 8, 8, 4, 5, 12, 13, 0, 9, 9, 9, 0, 0, 0, 0, 0, 6, 6, 6, 4, 5, 12, 13, 0, 7, 7, 7,
             0, 14, 14, 14, 0, 15, 15, 15]
_Q2K_NIB = [0, 0, 0, 0, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 0, 15, 15, 15,
            0, 15, 15, 15, 0, 15, 15, 15, 15, 15, 15, 15, 0, 15, 15, 15, 0, 0, 0, 0, 0, 15, 15, 15,
            15, 15, 15, 15, 0, 15, 15, 15, 0, 15, 15, 15, 0, 15, 15, 15]
_Q2K_QGE2 = [(0xcccfc0cfccc0ff00 >> i) & 1 for i in range(64)]   # table entries of q >= 2
_Q2K_QEQ3 = [(0x888f80808880f000 >> i) & 1 for i in range(64)]   # ... of q == 3
# per plane: the code bits kept, and the base index of each 128-bit lane (sub-block 8(m / 2) + 2j + m % 2)
_Q2K_MASK = (3, 0x0C, 0x30, 3)
_Q2K_BASES = ((20, 24, 28, 36), (0, 1, 2, 3), (0, 1, 2, 3), (44, 52, 56, 60))


def _unpack_q2_k_table(builder, pb):
    """scales[16] @0 (low nibble scale, high nibble min), qs[64] @16, d @80, dmin @82. The planes
    are q * sc (<= 45) in the activations' PERM_Q2_K order; no separate scales (None). Needs
    AVX-512 VBMI (vpermb)."""
    scales = vload(builder, pb, c64(0), vec(I8, 16))
    mins16 = builder.zext(builder.lshr(scales, splat(I8, 16, 4)), vec(I16, 16))
    sc = builder.and_(builder.shuffle_vector(scales, scales, ir.Constant(vec(I32, 64), _Q2K_PERM)),
                      _bytes(_Q2K_NIB))  # the scale of each entry where q >= 1, else 0
    doubled = builder.select(ir.Constant(vec(ir.IntType(1), 64), _Q2K_QGE2), builder.add(sc, sc), sc)
    t = builder.select(ir.Constant(vec(ir.IntType(1), 64), _Q2K_QEQ3), builder.add(doubled, sc), doubled)
    qs = vload(builder, pb, c64(16), vec(I8, 64))
    planes = []
    for j in range(4):
        codes = builder.lshr(qs, splat(I8, 64, 6)) if j == 3 else qs
        index = builder.or_(builder.and_(codes, splat(I8, 64, _Q2K_MASK[j])),
                            _bytes([b for b in _Q2K_BASES[j] for _ in range(16)]))
        planes.append(call(builder, "llvm.x86.avx512.permvar.qi.512", vec(I8, 64),
                           [vec(I8, 64), vec(I8, 64)], [t, index]))
    d, dmin = half_pair(builder, pb, c64(80))
    return planes, None, d, mins16, dmin, 0


def _unpack_q3_k_simd(builder, pb):
    """hmask[32] @0, qs[64] @32, scales[12] @96, d @108."""
    m1, m2 = ir.Constant(I32, 0x03030303), ir.Constant(I32, 0x0F0F0F0F)
    a0, a1, t = _i32_at(builder, pb, 96), _i32_at(builder, pb, 100), _i32_at(builder, pb, 104)

    def part(lo, tshift):
        return builder.or_(builder.and_(lo, m2),
                           builder.shl(builder.and_(builder.lshr(t, ir.Constant(I32, tshift)), m1), ir.Constant(I32, 4)))
    hi0, hi1 = builder.lshr(a0, ir.Constant(I32, 4)), builder.lshr(a1, ir.Constant(I32, 4))
    sc8 = _words_to_bytes(builder, [part(a0, 0), part(a1, 2), part(hi0, 4), part(hi1, 6)])  # ggml's kmask trick
    sc16 = builder.sext(builder.sub(sc8, splat(I8, 16, 32)), vec(I16, 16))
    qs = vload(builder, pb, c64(32), vec(I8, 64))
    hm = _dup32(builder, vload(builder, pb, c64(0), vec(I8, 32)))
    planes, scales = [], []
    for j in range(4):
        q = builder.and_(builder.lshr(qs, splat(I8, 64, 2 * j)), splat(I8, 64, 3))
        # high bit of element 128h + 32j + l: bit 4h + j of hmask[l] (h = byte // 32 of the plane)
        planes.append(_bit_add(builder, q, hm, [1 << j] * 32 + [1 << (4 + j)] * 32, 4))
        scales.append(_lanes16(builder, sc16, [2 * j, 2 * j + 1, 8 + 2 * j, 9 + 2 * j]))
    return planes, scales, half_at(builder, pb, c64(108)), sc16, None, 4


def _k4_scales_mins(builder, pb):
    """Q4_K / Q5_K: the 12 bytes at 4 -> <16 x i16>: lanes 0..7 the scales, 8..15 the mins."""
    k1, k2, k3 = ir.Constant(I32, 0x3F3F3F3F), ir.Constant(I32, 0x0F0F0F0F), ir.Constant(I32, 0x03030303)
    a, b, c = _i32_at(builder, pb, 4), _i32_at(builder, pb, 8), _i32_at(builder, pb, 12)
    six, four = ir.Constant(I32, 6), ir.Constant(I32, 4)
    u1 = builder.or_(builder.and_(c, k2), builder.shl(builder.and_(builder.lshr(a, six), k3), four))
    u3 = builder.or_(builder.and_(builder.lshr(c, four), k2), builder.shl(builder.and_(builder.lshr(b, six), k3), four))
    sm = _words_to_bytes(builder, [builder.and_(a, k1), u1, builder.and_(b, k1), u3])
    return builder.zext(sm, vec(I16, 16))


def _unpack_k4(builder, pb, qs_off, qh_off):
    """Q4_K (qh_off None) / Q5_K: d @0, dmin @2, scales[12] @4, [qh[32] @16], qs[128] @qs_off."""
    sm16 = _k4_scales_mins(builder, pb)
    # min of 32-element sub-block k // 2 for each bsum k
    mins16 = builder.shuffle_vector(sm16, sm16, ir.Constant(vec(I32, 16), [8 + k // 2 for k in range(16)]))
    qh = None if qh_off is None else _dup32(builder, vload(builder, pb, c64(qh_off), vec(I8, 32)))
    planes, scales = [], []
    for p in range(2):
        qs = vload(builder, pb, c64(qs_off + 64 * p), vec(I8, 64))
        for nib in range(2):
            q = _nibble(builder, qs, nib)
            s0, s1 = 2 * (2 * p) + nib, 2 * (2 * p + 1) + nib  # 32-element sub-blocks of bytes 0-31, 32-63
            if qh is not None:  # fifth bit of element 32 s + l: bit s of qh[l]
                q = _bit_add(builder, q, qh, [1 << s0] * 32 + [1 << s1] * 32, 16)
            planes.append(q)
            scales.append(_lanes16(builder, sm16, [s0, s0, s1, s1]))
    d, dmin = half_pair(builder, pb, c64(0))
    return planes, scales, d, mins16, dmin, 0


def _unpack_q4_k_simd(builder, pb):
    return _unpack_k4(builder, pb, 16, None)


def _unpack_q5_k_simd(builder, pb):
    return _unpack_k4(builder, pb, 48, 16)


def _unpack_q6_k_simd(builder, pb):
    """ql[128] @0, qh[64] @128, scales int8[16] @192, d @208."""
    sc16 = builder.sext(vload(builder, pb, c64(192), vec(I8, 16)), vec(I16, 16))
    planes, scales = [], []
    for h in range(2):
        ql = vload(builder, pb, c64(64 * h), vec(I8, 64))
        qh = builder.bitcast(_dup32(builder, vload(builder, pb, c64(128 + 32 * h), vec(I8, 32))), vec(I16, 32))
        for nib in range(2):
            # element 128h + 32k + l (k = 2 nib + byte // 32): top bits 2k of qh[32h + l]; a
            # per-half shift, done on int16 lanes (vpsrlvw: x86 has no variable byte shift)
            sh = ir.Constant(vec(I16, 32), [ir.Constant(I16, 4 * nib)] * 16 + [ir.Constant(I16, 4 * nib + 2)] * 16)
            top = builder.and_(builder.bitcast(builder.lshr(qh, sh), vec(I8, 64)), splat(I8, 64, 3))
            planes.append(builder.or_(_nibble(builder, ql, nib), builder.shl(top, splat(I8, 64, 4))))
            b = 8 * h + 4 * nib
            scales.append(_lanes16(builder, sc16, [b, b + 1, b + 2, b + 3]))
    return planes, scales, half_at(builder, pb, c64(208)), sc16, None, 32


KQ_ROWS_MAX = 8  # activation rows per intrinsic call: each weight block is unpacked once for them
# bytes per integer product: a 64-byte plane at once (AVX-512), or in two halves (AVX2; each half
# is 32 activations in natural order, the PERM only reorders whole halves, see PERM_Q2_K)
KQ_WIDTH = 64 if ISA == "avx512" else 32


def _part(builder, v, k, n):
    """Lanes k n .. k n + n - 1 of vector v (v itself when n is its width)."""
    if n == v.type.count:
        return v
    return builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(k * n, k * n + n))))


def _make_kq_rows(unpack, nbytes):
    """An intrinsic computing out[i0 + k, r] for k < cnt <= KQ_ROWS_MAX: weight row wr
    (super-blocks of `nbytes`, unpacked by `unpack` once per block) times cnt activation rows,
    each with a float accumulator of KQ_WIDTH / 4 lanes kept in a register (the row guards are
    branches that always go the same way within a call); one horizontal sum per output. cnt == 1
    (decode) has a loop of its own: the 8-row loop keeps all 8 accumulators live, and on AVX2 (16
    registers) spills them every block (Q2_K 4096x4096, n = 1: 1.23 -> 0.79 ms). Both loops do
    the same operations per row, so a row's result does not depend on cnt."""
    lanes = KQ_WIDTH // 4

    @intrinsic
    def rows_dot(typingctx, wr, xq, xd, bsums, out, r, i0, cnt):
        """wr uint8[row bytes]; activations block-major: xq int8[nb, n, 256] (in the type's PERM
        order), xd float32[nb, n], bsums int16[nb, n, 16]; out float32[n, rows]."""
        sig = types.void(wr, xq, xd, bsums, out, r, i0, cnt)

        def codegen(context, builder, signature, args):
            tys = signature.args
            pw, _ = arr(context, builder, tys[0], args[0])
            px, (nb, n, _) = arr(context, builder, tys[1], args[1])
            pxd, _ = arr(context, builder, tys[2], args[2])
            pbs, _ = arr(context, builder, tys[3], args[3])
            pout, (_, rows) = arr(context, builder, tys[4], args[4])
            r_, i0_ = args[5], args[6]
            cnt = context.cast(builder, args[7], tys[7], types.int64)
            vf, vi = vec(FLT, lanes), vec(I32, lanes)
            zf = ir.Constant(vf, [ir.Constant(FLT, 0.0)] * lanes)
            zi8 = ir.Constant(vec(I32, 8), [ir.Constant(I32, 0)] * 8)

            def for_rows(count):
                """Yield k < count, inside a guard k < cnt where count > 1."""
                for k in range(count):
                    if count == 1:
                        yield k
                        continue
                    with builder.if_then(builder.icmp_signed("<", c64(k), cnt), likely=True):
                        yield k

            def rows_loop(count):
                accs = [cgutils.alloca_once_value(builder, zf) for _ in range(count)]
                with cgutils.for_range(builder, nb) as lb:
                    b = lb.index
                    bo = builder.mul(b, c64(nbytes))
                    prefetch(builder, pw, bo, lines=(nbytes + 63) // 64)
                    planes, scales, d, corr16, dmin, offset = unpack(builder, builder.gep(pw, [bo]))
                    base = builder.add(builder.mul(b, n), i0_)  # (b, i0) in [nb, n]
                    for k in for_rows(count):
                        ib = builder.add(base, c64(k))
                        xo = builder.mul(ib, c64(256))
                        s = None
                        pair = [None, None]  # Q2_K: two vpdpbusd chains (planes 0, 1 and 2, 3), then one add
                        for j in range(4):
                            if scales is None:  # planes already times their scales (Q2_K): vpdpbusd
                                x = vload(builder, px, builder.add(xo, c64(64 * j)), vec(I8, 64))
                                pair[j // 2] = call(builder, "llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi],
                                                    [pair[j // 2] if j % 2 else ir.Constant(vi, [ir.Constant(I32, 0)] * lanes),
                                                     builder.bitcast(planes[j], vi), builder.bitcast(x, vi)])
                                if j == 3:
                                    s = builder.add(pair[0], pair[1])
                                continue
                            for h in range(64 // KQ_WIDTH):
                                x = vload(builder, px, builder.add(xo, c64(64 * j + KQ_WIDTH * h)), vec(I8, KQ_WIDTH))
                                t = madd(builder, _part(builder, planes[j], h, KQ_WIDTH), x,
                                         _part(builder, scales[j], h, KQ_WIDTH // 2))
                                s = t if s is None else builder.add(s, t)
                        bs = vload(builder, pbs, builder.mul(ib, c64(16)), vec(I16, 16))
                        mv = call(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [vec(I16, 16), vec(I16, 16)],
                                  [corr16, bs])
                        if lanes > 8:
                            mv = builder.shuffle_vector(mv, zi8, ir.Constant(vec(I32, lanes), list(range(lanes))))
                        if offset:  # the unsigned codes' offset, taken back exactly
                            s = builder.sub(s, builder.mul(mv, splat(I32, lanes, offset)))
                        dx = builder.load(builder.gep(pxd, [ib]))
                        t = builder.fmul(builder.sitofp(s, vf), bcast(builder, builder.fmul(d, dx), lanes))
                        if dmin is not None:  # the mins: dmin * dx * sum_k m_k bsum_k
                            t = fma(builder, builder.fneg(builder.sitofp(mv, vf)),
                                    bcast(builder, builder.fmul(dmin, dx), lanes), t)
                        # the block's sum made off the accumulator's chain, then one add on it:
                        # an add and a subtract there made every block wait ~8 cycles on the last
                        builder.store(builder.fadd(builder.load(accs[k]), t), accs[k])
                for k in for_rows(count):
                    i = builder.add(i0_, c64(k))
                    builder.store(hsum(builder, builder.load(accs[k])),
                                  builder.gep(pout, [builder.add(builder.mul(i, rows), r_)]))

            with builder.if_else(builder.icmp_signed("==", cnt, c64(1))) as (one, many):
                with one:
                    rows_loop(1)
                with many:
                    rows_loop(KQ_ROWS_MAX)
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


# the table lookup where the CPU has vpermb (VBMI: Ice Lake / Sapphire Rapids, Zen 4), else the
# plain planes and int16 scales (e.g. Cascade Lake: AVX-512 VNNI without VBMI; any AVX2 CPU)
_q2_k_rows = _make_kq_rows(_unpack_q2_k_table if ISA == "avx512" and llvm.get_host_cpu_features().get("avx512vbmi", False)
                           else _unpack_q2_k_simd, 84)
_q3_k_rows = _make_kq_rows(_unpack_q3_k_simd, 110)
_q4_k_rows = _make_kq_rows(_unpack_q4_k_simd, 144)
_q5_k_rows = _make_kq_rows(_unpack_q5_k_simd, 176)
_q6_k_rows = _make_kq_rows(_unpack_q6_k_simd, 210)


@njit(inline="always")
def _kq_simd_rows(kind, xq, xd, bsums, w, out, task, nt):
    """Rows of one task against all activation rows, a tile of nt at a time: the tile stays in
    L2 while the task's rows stream past it, KQ_ROWS_MAX activation rows per intrinsic call."""
    n = xq.shape[1]
    r0 = task * ROWS_PER_TASK
    r1 = min(w.shape[0], r0 + ROWS_PER_TASK)
    for t0 in range(0, n, nt):
        t1 = min(n, t0 + nt)
        for r in range(r0, r1):
            wr = w[r]
            for i in range(t0, t1, KQ_ROWS_MAX):
                cnt = min(KQ_ROWS_MAX, t1 - i)
                if kind == 2:
                    _q2_k_rows(wr, xq, xd, bsums, out, r, i, cnt)
                elif kind == 3:
                    _q3_k_rows(wr, xq, xd, bsums, out, r, i, cnt)
                elif kind == 4:
                    _q4_k_rows(wr, xq, xd, bsums, out, r, i, cnt)
                elif kind == 5:
                    _q5_k_rows(wr, xq, xd, bsums, out, r, i, cnt)
                else:
                    _q6_k_rows(wr, xq, xd, bsums, out, r, i, cnt)


# One cached kernel per type (the `kind` constant is folded after inlining). Arguments: xq
# int8[nb, n, 256] in PERM_<type> order, xd float32[nb, n], bsums int16[nb, n, 16], w
# uint8[rows, nb * block bytes], out float32[n, rows] (overwritten), nt activation rows per tile,
# threads: 1 runs a plain loop (matmul.SERIAL), more a parallel region on Numba's thread count.
@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q2_k_simd_kernel(xq, xd, bsums, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _kq_simd_rows(2, xq, xd, bsums, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _kq_simd_rows(2, xq, xd, bsums, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q3_k_simd_kernel(xq, xd, bsums, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _kq_simd_rows(3, xq, xd, bsums, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _kq_simd_rows(3, xq, xd, bsums, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q4_k_simd_kernel(xq, xd, bsums, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _kq_simd_rows(4, xq, xd, bsums, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _kq_simd_rows(4, xq, xd, bsums, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q5_k_simd_kernel(xq, xd, bsums, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _kq_simd_rows(5, xq, xd, bsums, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _kq_simd_rows(5, xq, xd, bsums, w, out, task, nt)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def _q6_k_simd_kernel(xq, xd, bsums, w, out, nt, threads):
    ntasks = (w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if threads == 1:
        for task in range(ntasks):
            _kq_simd_rows(6, xq, xd, bsums, w, out, task, nt)
    else:
        for task in prange(ntasks):
            _kq_simd_rows(6, xq, xd, bsums, w, out, task, nt)


SIMD_KERNELS = {"Q2_K": (_q2_k_simd_kernel, PERM_Q2_K), "Q3_K": (_q3_k_simd_kernel, PERM_Q3_K),
                "Q4_K": (_q4_k_simd_kernel, PERM_Q4_K), "Q5_K": (_q5_k_simd_kernel, PERM_Q5_K),
                "Q6_K": (_q6_k_simd_kernel, PERM_Q6_K)}
GENERIC_KERNELS = {"Q2_K": _q2_k_kernel, "Q3_K": _q3_k_kernel, "Q4_K": _q4_k_kernel,
                   "Q5_K": _q5_k_kernel, "Q6_K": _q6_k_kernel}
