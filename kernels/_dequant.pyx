# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Cython dequantizer: GGML block rows -> float32 rows, nogil, OpenMP over rows.

``dequantize_into(raw, qtype, out, threads)`` is the public, checked wrapper; each
``_row_*`` below dequantizes the blocks of one row and trusts its arguments.

Results are bit-identical to ``weightstream.kernels.reference`` (and so to ``gguf.quants`` and ggml's
scalar C): the same float32 operations in the same grouping. A compiler that fuses
``a * b + c`` into one FMA (GCC does by default once -march=native enables FMA) cannot change
a result here, because every product that feeds an add is exact in float32: an fp16 scale
has an 11-bit significand, sub-block scales/mins have at most 6 bits and quants at most 5,
so ``d * sc`` fits in 17 bits and ``(d * sc) * q`` in 22, under float32's 24, and the range
(fp16 max 65504 * 63 * 31) stays far from overflow and, for subnormal scales, from underflow.
The one product that can round (Q6_K's ``(d * sc) * q``: 19 + 6 bits) feeds no add. So
no -ffp-contract flag is needed; tests/test_dequant_cython.py checks bits at extreme scales.

Build flags: ``-O3 -march=native -fopenmp`` to compile, ``-fopenmp`` to link.

Blocks are read as bytes at the offsets of ``kernels/formats.py`` (ggml-common.h); 16- and
32-bit fields are read as unaligned little-endian values, so nothing depends on alignment or
on the host's byte order.
"""

from cython.parallel cimport prange
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from gguf import GGMLQuantizationType

from .traits import TRAITS

# type numbers, block sizes and the fp16 / little-endian loads (kernels/csrc/common.h)
cdef extern from "common.h":
    enum:
        WS_F32, WS_F16, WS_BF16, WS_Q4_0, WS_Q4_1, WS_Q5_0, WS_Q5_1, WS_Q8_0
        WS_Q2_K, WS_Q3_K, WS_Q4_K, WS_Q5_K, WS_Q6_K
    int block_elements "ws_block_elements" (int t) noexcept nogil
    int block_bytes "ws_block_bytes" (int t) noexcept nogil
    float fp16_to_fp32 "ws_fp16_to_fp32" (uint16_t h) noexcept nogil
    float bf16_to_fp32 "ws_bf16_to_fp32" (uint16_t h) noexcept nogil
    uint16_t load_u16 "ws_load_u16" (const uint8_t *p) noexcept nogil
    uint32_t load_u32 "ws_load_u32" (const uint8_t *p) noexcept nogil
    # The output row as a restrict pointer: uint8_t reads may alias any store in C, and
    # without this the compiler must assume a store to y can change the block bytes,
    # which keeps it from vectorising the inner loops.
    ctypedef float *out_ptr "float * __restrict__"


# {type value: (elements per block, bytes per block)}, as formats.block_size, for the types of
# kernels/traits.py (common.h's numbers; the tests check the two agree).
BLOCK_SIZES = {int(q): (block_elements(q), block_bytes(q)) for q in TRAITS}
SUPPORTED = frozenset(BLOCK_SIZES)


# ---------------------------------------------------------------------------
# Dense types
# ---------------------------------------------------------------------------

cdef inline void _row_f16(const uint8_t *x, out_ptr y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = fp16_to_fp32(load_u16(x + 2 * i))


cdef inline void _row_bf16(const uint8_t *x, out_ptr y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = bf16_to_fp32(load_u16(x + 2 * i))


# ---------------------------------------------------------------------------
# Legacy 32-element blocks. Byte 0..1 is d; quants follow.
# Nibble layout: byte j holds element j (low nibble) and element j + 16 (high nibble).
# ---------------------------------------------------------------------------

cdef inline void _row_q8_0(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q8_0: d[2] qs[32] (int8); y = q * d
    cdef Py_ssize_t i, j
    cdef float d
    cdef const int8_t *qs
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        qs = <const int8_t *>(x + 2)
        for j in range(32):
            y[j] = <float>qs[j] * d
        x += 34
        y += 32


cdef inline void _row_q4_0(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q4_0: d[2] qs[16]; y = (nibble - 8) * d
    cdef Py_ssize_t i, j
    cdef float d
    cdef const uint8_t *qs
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        qs = x + 2
        # One loop per nibble: GCC 12 vectorises these, but not the loop storing both.
        for j in range(16):
            y[j] = <float>(<int>(qs[j] & 0x0F) - 8) * d
        for j in range(16):
            y[j + 16] = <float>(<int>(qs[j] >> 4) - 8) * d
        x += 18
        y += 32


cdef inline void _row_q4_1(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q4_1: d[2] m[2] qs[16]; y = nibble * d + m (two roundings: no FMA)
    cdef Py_ssize_t i, j
    cdef float d, m
    cdef const uint8_t *qs
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        m = fp16_to_fp32(load_u16(x + 2))
        qs = x + 4
        for j in range(16):  # one loop per nibble, as Q4_0
            y[j] = <float>(qs[j] & 0x0F) * d + m
        for j in range(16):
            y[j + 16] = <float>(qs[j] >> 4) * d + m
        x += 20
        y += 32


cdef inline void _row_q5_0(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q5_0: d[2] qh[4] qs[16]; bit j of qh (little-endian uint32) is the fifth bit of
    # element j; y = ((nibble | fifth << 4) - 16) * d
    cdef Py_ssize_t i, j
    cdef float d
    cdef uint32_t qh
    cdef const uint8_t *qs
    cdef int32_t lo, hi
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        qh = load_u32(x + 2)
        qs = x + 6
        for j in range(16):
            lo = <int32_t>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16
            hi = <int32_t>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16
            y[j] = <float>lo * d
            y[j + 16] = <float>hi * d
        x += 22
        y += 32


cdef inline void _row_q5_1(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q5_1: d[2] m[2] qh[4] qs[16]; y = (nibble | fifth << 4) * d + m
    cdef Py_ssize_t i, j
    cdef float d, m
    cdef uint32_t qh
    cdef const uint8_t *qs
    cdef int32_t lo, hi
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        m = fp16_to_fp32(load_u16(x + 2))
        qh = load_u32(x + 4)
        qs = x + 8
        for j in range(16):
            lo = <int32_t>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4))
            hi = <int32_t>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4))
            y[j] = <float>lo * d + m
            y[j + 16] = <float>hi * d + m
        x += 24
        y += 32


# ---------------------------------------------------------------------------
# k-quants: 256-element super-blocks
# ---------------------------------------------------------------------------

cdef inline void _row_q2_k(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q2_K: scales[16] qs[64] d[2] dmin[2]. Element 128h + 32j + 16s + l is bits 2j..2j+1
    # of qs[32h + 16s + l]; its sub-block 8h + 2j + s has scale byte (min << 4 | scale).
    # y = dl * q - ml with dl = d * scale, ml = dmin * min rounded once per sub-block (ggml).
    cdef Py_ssize_t i, h, j, s, l
    cdef float d, dmin, dl, ml
    cdef const uint8_t *scales
    cdef const uint8_t *q
    cdef uint8_t sc
    cdef int shift
    for i in range(nb):
        scales = x
        d = fp16_to_fp32(load_u16(x + 80))
        dmin = fp16_to_fp32(load_u16(x + 82))
        for h in range(2):
            q = x + 16 + 32 * h
            for j in range(4):
                shift = 2 * j
                for s in range(2):
                    sc = scales[8 * h + 2 * j + s]
                    dl = d * <float>(sc & 0x0F)
                    ml = dmin * <float>(sc >> 4)
                    for l in range(16):
                        y[l] = dl * <float>((q[16 * s + l] >> shift) & 3) - ml
                    y += 16
        x += 84


cdef inline void _row_q3_k(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q3_K: hmask[32] qs[64] scales[12] d[2]. Low 2 bits as Q2_K; bit 4h + j of hmask[l']
    # (l' = 16s + l) is the high bit, and a clear high bit means q - 4.
    # 16 signed 6-bit scales: low 4 bits in byte k (k < 8) or the high nibble of byte k - 8;
    # high 2 bits in byte 8 + k % 4 at bit 2 * (k / 4); minus 32. y = (d * scale) * q.
    cdef Py_ssize_t i, h, j, s, l, k
    cdef float d, dl
    cdef const uint8_t *hmask
    cdef const uint8_t *q
    cdef const uint8_t *packed
    cdef int sc[16]
    cdef int shift, qv
    cdef uint8_t m
    for i in range(nb):
        hmask = x
        packed = x + 96
        d = fp16_to_fp32(load_u16(x + 108))
        for k in range(8):
            sc[k] = (packed[k] & 0x0F) | (((packed[8 + k % 4] >> (2 * (k // 4))) & 3) << 4)
            sc[k + 8] = (packed[k] >> 4) | (((packed[8 + k % 4] >> (2 * (k // 4 + 2))) & 3) << 4)
        for h in range(2):
            q = x + 32 + 32 * h
            for j in range(4):
                shift = 2 * j
                m = <uint8_t>(1 << (4 * h + j))
                for s in range(2):
                    dl = d * <float>(sc[8 * h + 2 * j + s] - 32)
                    for l in range(16):
                        qv = ((q[16 * s + l] >> shift) & 3) - (0 if (hmask[16 * s + l] & m) else 4)
                        y[l] = dl * <float>qv
                    y += 16
        x += 110


cdef inline void _k4_scale_min(const uint8_t *q, int j, uint8_t *sc, uint8_t *m) noexcept nogil:
    # ggml get_scale_min_k4: 8 6-bit (scale, min) pairs packed in 12 bytes.
    if j < 4:
        sc[0] = q[j] & 63
        m[0] = q[j + 4] & 63
    else:
        sc[0] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4)
        m[0] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


cdef inline void _row_q4_k(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q4_K: d[2] dmin[2] scales[12] qs[128]. Element 64c + 32h + l is the low (h = 0)
    # or high (h = 1) nibble of qs[32c + l], in sub-block 2c + h. y = d1 * q - m1.
    cdef Py_ssize_t i, c, l
    cdef float d, dmin, d1, m1, d2, m2
    cdef const uint8_t *scales
    cdef const uint8_t *q
    cdef uint8_t sc, m
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        dmin = fp16_to_fp32(load_u16(x + 2))
        scales = x + 4
        q = x + 16
        for c in range(4):
            _k4_scale_min(scales, 2 * c, &sc, &m)
            d1 = d * <float>sc
            m1 = dmin * <float>m
            _k4_scale_min(scales, 2 * c + 1, &sc, &m)
            d2 = d * <float>sc
            m2 = dmin * <float>m
            for l in range(32):
                y[l] = d1 * <float>(q[l] & 0x0F) - m1
                y[l + 32] = d2 * <float>(q[l] >> 4) - m2
            q += 32
            y += 64
        x += 144


cdef inline void _row_q5_k(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q5_K: d[2] dmin[2] scales[12] qh[32] qs[128]. As Q4_K; bit (2c + h) of qh[l] is
    # the fifth bit (+16) of element 64c + 32h + l.
    cdef Py_ssize_t i, c, l
    cdef float d, dmin, d1, m1, d2, m2
    cdef const uint8_t *scales
    cdef const uint8_t *qh
    cdef const uint8_t *q
    cdef uint8_t sc, m, u1, u2
    for i in range(nb):
        d = fp16_to_fp32(load_u16(x))
        dmin = fp16_to_fp32(load_u16(x + 2))
        scales = x + 4
        qh = x + 16
        q = x + 48
        for c in range(4):
            _k4_scale_min(scales, 2 * c, &sc, &m)
            d1 = d * <float>sc
            m1 = dmin * <float>m
            _k4_scale_min(scales, 2 * c + 1, &sc, &m)
            d2 = d * <float>sc
            m2 = dmin * <float>m
            u1 = <uint8_t>(1 << (2 * c))
            u2 = <uint8_t>(1 << (2 * c + 1))
            for l in range(32):
                y[l] = d1 * <float>((q[l] & 0x0F) + (16 if (qh[l] & u1) else 0)) - m1
                y[l + 32] = d2 * <float>((q[l] >> 4) + (16 if (qh[l] & u2) else 0)) - m2
            q += 32
            y += 64
        x += 176


cdef inline void _row_q6_k(const uint8_t *x, out_ptr y, Py_ssize_t nb) noexcept nogil:
    # block_q6_K: ql[128] qh[64] scales[16] (int8) d[2]. Per 128-element half, lane l (0..31)
    # gives 4 elements l + 32k (k = 0..3): the low (k < 2) or high (k >= 2) nibble of
    # ql[l + 32 (k % 2)], bits 2k..2k+1 of qh[l] on top, minus 32; sub-block (l + 32k) / 16,
    # so lanes 0..15 and 16..31 each share four scales. y = (d * scale) * q, left to right
    # as ggml's d * sc[is] * q.
    cdef Py_ssize_t i, h, s, l
    cdef float d, d0, d1, d2, d3
    cdef const uint8_t *ql
    cdef const uint8_t *qh
    cdef const int8_t *sc
    for i in range(nb):
        ql = x
        qh = x + 128
        sc = <const int8_t *>(x + 192)
        d = fp16_to_fp32(load_u16(x + 208))
        for h in range(2):
            for s in range(2):
                d0 = d * <float>sc[s]
                d1 = d * <float>sc[s + 2]
                d2 = d * <float>sc[s + 4]
                d3 = d * <float>sc[s + 6]
                for l in range(16 * s, 16 * s + 16):
                    y[l] = d0 * <float>(<int>((ql[l] & 0x0F) | ((qh[l] & 0x03) << 4)) - 32)
                    y[l + 32] = d1 * <float>(<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 0x03) << 4)) - 32)
                    y[l + 64] = d2 * <float>(<int>((ql[l] >> 4) | (((qh[l] >> 4) & 0x03) << 4)) - 32)
                    y[l + 96] = d3 * <float>(<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 0x03) << 4)) - 32)
            ql += 64
            qh += 32
            sc += 8
            y += 128
        x += 210


cdef inline void _dequant_row(int qtype, const uint8_t *x, out_ptr y, Py_ssize_t nb,
                              Py_ssize_t cols) noexcept nogil:
    # nb: blocks in the row; cols: elements in the row (= nb for the dense types).
    if qtype == WS_Q2_K:
        _row_q2_k(x, y, nb)
    elif qtype == WS_Q3_K:
        _row_q3_k(x, y, nb)
    elif qtype == WS_Q4_K:
        _row_q4_k(x, y, nb)
    elif qtype == WS_Q5_K:
        _row_q5_k(x, y, nb)
    elif qtype == WS_Q6_K:
        _row_q6_k(x, y, nb)
    elif qtype == WS_Q8_0:
        _row_q8_0(x, y, nb)
    elif qtype == WS_Q4_0:
        _row_q4_0(x, y, nb)
    elif qtype == WS_Q4_1:
        _row_q4_1(x, y, nb)
    elif qtype == WS_Q5_0:
        _row_q5_0(x, y, nb)
    elif qtype == WS_Q5_1:
        _row_q5_1(x, y, nb)
    elif qtype == WS_F16:
        _row_f16(x, y, cols)
    elif qtype == WS_BF16:
        _row_bf16(x, y, cols)
    elif qtype == WS_F32:
        memcpy(y, x, <size_t>cols * sizeof(float))  # a byte copy keeps NaN payloads


def dequantize_into(const uint8_t[:, ::1] raw, int qtype, float[:, ::1] out, int threads=1):
    """Dequantize ``raw`` (``uint8[rows, bytes_per_row]``, C-contiguous) of GGML type
    ``qtype`` into ``out`` (``float32[rows, cols]``, C-contiguous), ``threads`` OpenMP
    threads over rows. Bit-identical to ``weightstream.kernels.reference.dequantize``."""
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"unsupported GGML type {qtype!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    name = GGMLQuantizationType(qtype).name
    cdef Py_ssize_t elements, nbytes
    elements, nbytes = BLOCK_SIZES[qtype]
    cdef Py_ssize_t rows = raw.shape[0]
    cdef Py_ssize_t cols = out.shape[1]
    if out.shape[0] != rows:
        raise ValueError(f"raw has {rows} rows, out has {out.shape[0]}")
    if cols % elements != 0:
        raise ValueError(f"{name}: row of {cols} elements is not a whole number of {elements}-element blocks")
    cdef Py_ssize_t nb = cols // elements
    if raw.shape[1] != nb * nbytes:
        raise ValueError(f"{name}: {cols} elements need {nb * nbytes} bytes per row, raw has {raw.shape[1]}")
    if rows == 0 or cols == 0:
        return
    cdef Py_ssize_t r
    with nogil:
        for r in prange(rows, num_threads=threads, schedule="static"):
            _dequant_row(qtype, &raw[r, 0], &out[r, 0], nb, cols)
