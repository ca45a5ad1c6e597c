/* Block kernels for kernels/_kquants.pyx: one k-quant weight row times 1..8 Q8_K activation rows.
 *
 * The Cython module quantizes the activations (Q8_K: int8 qs, float d per 256, and fb = d * bsum
 * per 16 as float, or on AVX2 builds the int16 bsums: WS_KQ_BSUMS and the AVX2 section below),
 * tiles rows and threads; this header holds only the per-block math, as
 * intrinsics (AVX-512 F/BW/VL + VNNI + VBMI + F16C, chosen at compile time) or as portable scalar C
 * (any other build, e.g. WEIGHTSTREAM_PORTABLE=1). Both compute, per weight block and activation row,
 *
 *     acc += (d * dx) * sum_k sc_k * sum_{i in sub-block k} q'_i * x_i   (exact, int32)
 *          - sum_k g_k * fb_k                                          (float, 16 lanes)
 *
 * with q' >= 0 an unsigned weight code and g_k the per-16 constant term:
 *     Q2_K: q' = 2-bit q, sc = low nibble,      g = dmin * (high nibble)
 *     Q3_K: q' = q + 4 (0..7), sc = 6-bit - 32, g = 4 * d * sc
 *     Q4_K: q' = nibble,        sc = 6-bit,     g = dmin * m   (per 32: two 16s)
 *     Q5_K: q' = nibble | hbit<<4,              as Q4_K
 *     Q6_K: q' = q + 32 (0..63), sc = int8,     g = 32 * d * sc
 * so the result equals dequant(W) . dequant(Q8_K(x)) up to float summation order.
 *
 * Vector layout: zmm p (p = 0..3) holds elements 64p..64p+63 of a block in natural order, so the
 * activations are read as Q8_K stores them; each 128-bit lane of it is one 16-element sub-block.
 * Q2_K: the four 2-bit codes and the 16 4-bit scales make a 64-byte table q * sc (<= 45) indexed by
 * (sub-block << 2 | q), looked up with one vpermb; the weights are then already scaled and a
 * single vpdpbusd per 64 weights does the rest. Others (AVX-512): vpdpbusd of the codes (u8 x
 * s8, 4 a lane), two zmm's sums packed to int16, then vpdpwssd with the sub-block scales as
 * int16 (ws_kq_block_dot); AVX2: vpmaddubsw (u8 x s8 -> s16 pairs), then vpmaddwd with them.
 */
#ifndef WS_KQUANTS_SIMD_H
#define WS_KQUANTS_SIMD_H

#include "common.h"
#include "sum16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__F16C__)
#define WS_KQ_AVX512 1
#define WS_KQ_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* AVX2 machines (seen: AMD EPYC Zen 3): 256-bit vectors, no VNNI; the scalar path there ran a
   Q2_K 4096x4096 product at 1% of one core's bandwidth */
#define WS_KQ_AVX512 0
#define WS_KQ_AVX2 1
#include <immintrin.h>
#else
#define WS_KQ_AVX512 0
#define WS_KQ_AVX2 0
#endif

/* What a block's 64-byte min-term slot (ws_kq_act.fb) holds, chosen per build: scalar builds
   store fb_k = d * bsum_k as 16 floats; AVX-512 and AVX2 builds store the 16 int16 bsum_k in its
   first 32 bytes (ggml's Q8_K bsums), for one vpmaddwd against the int16 mins or scales: exact
   int32 sums, one conversion, where the float form took widenings, conversions, a multiply and a
   16-lane FMA a block (C harness, Zen 3, Q2_K decode: 10.5 -> 9.5 ns a block; llama.cpp's
   vec_dot_q2_K_q8_K 9.5 in the same run; Zen 4, AVX-512: see ws_kq_row_term). */
#define WS_KQ_BSUMS (WS_KQ_AVX512 || WS_KQ_AVX2)

#ifndef WS_KQ_PREFETCH
/* bytes ahead of the block being unpacked: 4096 streamed a 30B-A3B decode step's experts (Q2_K,
   cold, 2 threads, Intel SPR) at 22.3 GB/s where 2048 gave 19.6 (interleaved A/B in one process,
   medians of 20; 3072 21.8, 6144 22.2, 8192 22.1; prefetching to L2 (T1 / T2) instead: 20.2) */
#define WS_KQ_PREFETCH 4096
#endif
/* activation rows per tile, the most a weight block's unpack serves: AVX-512 8 (int16 bsums keep
   the min term in 8-lane accumulators; Zen 4, one thread, n = 8 as one tile of 8 instead of 6 + 2:
   0.80-0.89x the time, n = 64 0.94-0.96x), AVX2 6 (16 ymm registers) */
#if WS_KQ_AVX512
#define WS_KQ_NRMAX 8
#else
#define WS_KQ_NRMAX 6
#endif

/* A tile of Q8_K activation rows, pointers at row 0 and the first block of the call. */
typedef struct {
    const int8_t *qx;     /* int8 quants, row stride qx_stride (= cols) */
    const float *dx;      /* block scales, row stride dx_stride (= nb) */
    const float *fb;      /* min-term slots, 16 floats a block (WS_KQ_BSUMS), row stride fb_stride (= 16 nb) */
    int64_t qx_stride, dx_stride, fb_stride;
} ws_kq_act;

/* 1 where the kernel reads each block's 256 int8 activations permuted: position 64j + 32h + l
   holds element 128h + 32j + l, the order of Q2_K's 2-bit planes (plane j of qs[32h + l]), so
   that one 64-byte load of qs feeds all four planes without cross-lane work. */
#define WS_KQ_PERMUTED(qtype) (WS_KQ_AVX512 && (qtype) == WS_Q2_K)

/* Q3_K's 12 bytes -> 16 unsigned 6-bit scales (ggml's kmask trick). */
static inline void ws_kq_q3_scales(const uint8_t *s, uint32_t aux[4]) {
    const uint32_t m1 = 0x03030303u, m2 = 0x0f0f0f0fu;
    uint32_t a0 = ws_load_u32(s), a1 = ws_load_u32(s + 4), t = ws_load_u32(s + 8);
    aux[0] = (a0 & m2) | (((t >> 0) & m1) << 4);
    aux[1] = (a1 & m2) | (((t >> 2) & m1) << 4);
    aux[2] = ((a0 >> 4) & m2) | (((t >> 4) & m1) << 4);
    aux[3] = ((a1 >> 4) & m2) | (((t >> 6) & m1) << 4);
}

/* Q4_K / Q5_K's 12 bytes -> bytes 0..7: the 8 scales, bytes 8..15: the 8 mins (6-bit). */
static inline void ws_kq_k4_scales(const uint8_t *s, uint32_t u[4]) {
    const uint32_t k1 = 0x3f3f3f3fu, k2 = 0x0f0f0f0fu, k3 = 0x03030303u;
    uint32_t a = ws_load_u32(s), b = ws_load_u32(s + 4), c = ws_load_u32(s + 8);
    u[0] = a & k1;
    u[1] = (c & k2) | (((a >> 6) & k3) << 4);
    u[2] = b & k1;
    u[3] = ((c >> 4) & k2) | (((b >> 6) & k3) << 4);
}

#if WS_KQ_AVX512 || WS_KQ_AVX2
#define WS_AI static inline __attribute__((always_inline))

/* four 32-bit words just computed in registers, as one xmm by vmovd / vpinsrd, never a store
   and a vector load of it (two stores read back as one load stall on store forwarding, ~15
   cycles: measured at 28% of a Q3_K block's samples) */
WS_AI __m128i ws_u32x4(const uint32_t v[4]) {
    return _mm_setr_epi32((int)v[0], (int)v[1], (int)v[2], (int)v[3]);
}

/* software prefetch of the block dist bytes on from blk (the block's lines, T0): one core's
   hardware prefetcher keeps too few lines in flight to stream weights at the memory's rate
   (measured: Q2_K 14336x4096 cold 4.0 ms without, see bench/RESULTS.md). dist is
   WS_KQ_PREFETCH where a thread's blocks are consecutive (blk + dist is what it reads next),
   else what the caller reads next (ws_kq_rows' pf) */
WS_AI void ws_kq_prefetch_ahead(const uint8_t *blk, const int bb, const int64_t dist) {
    for (int o = 0; o < bb; o += 64)
        _mm_prefetch((const char *)blk + dist + o, _MM_HINT_T0);
}

/* Q3_K / Q6_K: log2 of the factor (4, 32) their constant term enters the int32 sum with; 0: the
   type has a separate dmin term */
WS_AI int ws_kq_fold(const int qtype) { return qtype == WS_Q3_K ? 2 : qtype == WS_Q6_K ? 5 : 0; }

/* row r's int16 bsums of block ib (WS_KQ_BSUMS: the first half of the block's min-term slot) */
WS_AI __m256i ws_kq_bsums(const ws_kq_act *a, int r, int64_t ib) {
    return _mm256_loadu_si256((const __m256i *)(a->fb + r * a->fb_stride + 16 * ib));
}

#endif

#if WS_KQ_AVX512

/* a zmm whose 128-bit lane m holds byte b_m (16 times) */
#define WS_LANES8(b0, b1, b2, b3) _mm512_set_epi32( \
    (b3) * 0x01010101, (b3) * 0x01010101, (b3) * 0x01010101, (b3) * 0x01010101, \
    (b2) * 0x01010101, (b2) * 0x01010101, (b2) * 0x01010101, (b2) * 0x01010101, \
    (b1) * 0x01010101, (b1) * 0x01010101, (b1) * 0x01010101, (b1) * 0x01010101, \
    (b0) * 0x01010101, (b0) * 0x01010101, (b0) * 0x01010101, (b0) * 0x01010101)
/* ... word a_m in words 0-3 and word b_m in words 4-7 (the order of ws_kq_block_dot's packed
   sums: a vpermw index picking scale a_m, b_m for lane m of the two packed code zmm) */
#define WS_PACKED16(a0, b0, a1, b1, a2, b2, a3, b3) _mm512_set_epi32( \
    (b3) * 0x10001, (b3) * 0x10001, (a3) * 0x10001, (a3) * 0x10001, \
    (b2) * 0x10001, (b2) * 0x10001, (a2) * 0x10001, (a2) * 0x10001, \
    (b1) * 0x10001, (b1) * 0x10001, (a1) * 0x10001, (a1) * 0x10001, \
    (b0) * 0x10001, (b0) * 0x10001, (a0) * 0x10001, (a0) * 0x10001)
/* lower 256 bits: a, upper: b (any element width, as a repeated 32-bit pattern) */
#define WS_HALVES32(a, b) _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1)

/* One weight block, unpacked: 4 x 64 unsigned codes (Q2_K: already times its scale), the int16
   sub-block scales matching each (not used by Q2_K), the 16 int16 constant-term factors m_k
   (Q2_K / Q4_K / Q5_K: the mins; Q3_K / Q6_K: the scales times 4 / 32, so that their constant
   term is one integer subtraction, ws_kq_row_term), d, and dmin (Q3_K / Q6_K: d again), both
   from ws_kq_scales (times dx there for one activation row). */
typedef struct {
    __m512i w[4];
    __m512i s[4];
    __m256i m;
    __m512 d;
    __m256 dmin;
} ws_ublk;

/* d and dmin from the block's two ws_kq_scales floats */
WS_AI void ws_kq_set_d(const float *dm, ws_ublk *u) {
    u->d = _mm512_set1_ps(dm[0]);
    u->dmin = _mm256_set1_ps(dm[1]);
}

WS_AI __m512i ws_bcast256(const uint8_t *p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* Q3_K / Q6_K: the 16 int16 scales (the low 16 words of sw; 128-bit lane m of code zmm p is
   sub-block 4p + m) in the order of ws_kq_block_dot's packed sums: lane L of s[h] holds in words
   0-3 the scale of zmm 2h's lane L (sub-block 8h + L), in words 4-7 that of zmm 2h + 1's
   (sub-block 8h + 4 + L); s[2], s[3] unused */
WS_AI void ws_spread16(__m512i sw, __m512i s[4]) {
    s[0] = _mm512_permutexvar_epi16(WS_PACKED16(0, 4, 1, 5, 2, 6, 3, 7), sw);
    s[1] = _mm512_permutexvar_epi16(WS_PACKED16(8, 12, 9, 13, 10, 14, 11, 15), sw);
}

/* Q2_K (activations permuted, WS_KQ_PERMUTED): zmm j = plane j of the 64 qs bytes; its
   128-bit lane m is sub-block 8(m / 2) + 2j + m % 2. The weights come out already multiplied by
   their scales from one 64-entry byte table T looked up with vpermb (6-bit index). The planes'
   2-bit codes are left where they sit in the byte (bits 0-1, 2-3, 4-5; plane 3 shifted down),
   and each (plane, lane) gets its own index range around them:
       plane 0: base + q (bases 20, 24, 28, 36)    plane 1: base + 4q  (bases 0..3)
       plane 2: base + 16q (bases 0..3)            plane 3: base + q   (bases 44, 52, 56, 60)
   so an index is (code bits & mask) | base: one vpternlogd, no shift for planes 0-2.
   T[index] = q * sc[sub-block] is built by one vpermb of the scale bytes (ws_q2k_perm), a mask
   keeping the low nibble where q >= 1, and two masked byte adds (x2 where q >= 2, +1x where 3). */
static const uint8_t ws_q2k_perm[64] __attribute__((aligned(64))) = {
    0, 0, 0, 0, 2, 3, 10, 11, 2, 3, 10, 11, 2, 3, 10, 11, 4, 5, 12, 13, 0, 0, 0, 0, 0, 1, 1, 1,
    0, 8, 8, 8, 4, 5, 12, 13, 0, 9, 9, 9, 0, 0, 0, 0, 0, 6, 6, 6, 4, 5, 12, 13, 0, 7, 7, 7,
    0, 14, 14, 14, 0, 15, 15, 15};
static const uint8_t ws_q2k_nib[64] __attribute__((aligned(64))) = {
    0, 0, 0, 0, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 0, 15, 15, 15,
    0, 15, 15, 15, 0, 15, 15, 15, 15, 15, 15, 15, 0, 15, 15, 15, 0, 0, 0, 0, 0, 15, 15, 15,
    15, 15, 15, 15, 0, 15, 15, 15, 0, 15, 15, 15, 0, 15, 15, 15};
#define WS_Q2K_QGE2 0xcccfc0cfccc0ff00ull
#define WS_Q2K_QEQ3 0x888f80808880f000ull

WS_AI void ws_unpack_q2k(const uint8_t *b, const float *dm, ws_ublk *u) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)b);
    __m512i t = _mm512_permutexvar_epi8(_mm512_load_si512(ws_q2k_perm), _mm512_castsi128_si512(sc));
    t = _mm512_and_si512(t, _mm512_load_si512(ws_q2k_nib));
    __m512i t2 = _mm512_mask_add_epi8(t, WS_Q2K_QGE2, t, t);
    t2 = _mm512_mask_add_epi8(t2, WS_Q2K_QEQ3, t2, t);
    __m512i qs = _mm512_loadu_si512((const void *)(b + 16));
    /* qs in a register from here on: vpternlogd overwrites its first source, and GCC otherwise
       loads qs again for each plane (4 loads of 64 bytes a block; Zen 4 does one a cycle) */
    __asm__("" : "+v"(qs));
    const __m512i m3 = _mm512_set1_epi8(3);
    u->w[0] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(qs, m3, WS_LANES8(20, 24, 28, 36), 0xEA), t2);
    u->w[1] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(qs, _mm512_set1_epi8(0x0C),
                                      WS_LANES8(0, 1, 2, 3), 0xEA), t2);
    u->w[2] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(qs, _mm512_set1_epi8(0x30),
                                      WS_LANES8(0, 1, 2, 3), 0xEA), t2);
    u->w[3] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(_mm512_srli_epi16(qs, 6), m3,
                                      WS_LANES8(44, 52, 56, 60), 0xEA), t2);
    u->m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15)));
    ws_kq_set_d(dm, u);
}

WS_AI void ws_unpack_q3k(const uint8_t *b, const float *dm, ws_ublk *u) {
    uint32_t aux[4];
    ws_kq_q3_scales(b + 96, aux);
    const __m128i sc = _mm_sub_epi8(ws_u32x4(aux), _mm_set1_epi8(32));
    const __m256i sw = _mm256_cvtepi8_epi16(sc);
    ws_spread16(_mm512_castsi256_si512(sw), u->s);
    u->m = _mm256_slli_epi16(sw, 2);   /* 4 sc_k: |.| <= 128 */
    const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
    const __m512i sh0 = WS_HALVES32(0, 0x00020002), sh1 = WS_HALVES32(0x00040004, 0x00060006);
    const __m512i hm = ws_bcast256(b);
    const __m512i lo = ws_bcast256(b + 32), hi = ws_bcast256(b + 64);
    __m512i q;
    /* zmm p = 2h + j2: low bits from qs half h at shifts 4*j2 (+2 upper), high bit 4h + 2*j2 (+1) */
    q = _mm512_and_si512(_mm512_srlv_epi16(lo, sh0), three);
    u->w[0] = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hm, WS_HALVES32(0x01010101, 0x02020202)), q, four);
    q = _mm512_and_si512(_mm512_srlv_epi16(lo, sh1), three);
    u->w[1] = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hm, WS_HALVES32(0x04040404, 0x08080808)), q, four);
    q = _mm512_and_si512(_mm512_srlv_epi16(hi, sh0), three);
    u->w[2] = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hm, WS_HALVES32(0x10101010, 0x20202020)), q, four);
    q = _mm512_and_si512(_mm512_srlv_epi16(hi, sh1), three);
    u->w[3] = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hm, WS_HALVES32(0x40404040, (int)0x80808080)), q, four);
    ws_kq_set_d(dm, u);
}

/* Q4_K / Q5_K: scales and mins; zmm c holds sub-blocks 2c (low nibbles) and 2c+1 (high). */
WS_AI void ws_k4_common(const uint8_t *b, const float *dm, ws_ublk *u) {
    uint32_t sm[4];
    ws_kq_k4_scales(b + 4, sm);
    const __m128i v = ws_u32x4(sm);
    const __m512i sw = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(v));
    /* the scales in the order of ws_kq_block_dot's packed sums (only s[0], s[1]): 128-bit lane L
       of s[h] holds in words 0-3 the scale of zmm 2h's lane L (sub-block 4h + L / 2), in words
       4-7 that of zmm 2h + 1's (sub-block 4h + 2 + L / 2) */
    u->s[0] = _mm512_permutexvar_epi16(WS_PACKED16(0, 2, 0, 2, 1, 3, 1, 3), sw);
    u->s[1] = _mm512_permutexvar_epi16(WS_PACKED16(4, 6, 4, 6, 5, 7, 5, 7), sw);
    const __m128i mins = _mm_shuffle_epi8(v, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12,
                                                          11, 11, 10, 10, 9, 9, 8, 8));
    u->m = _mm256_cvtepu8_epi16(mins);
    ws_kq_set_d(dm, u);
}

WS_AI void ws_unpack_q4k(const uint8_t *b, const float *dm, ws_ublk *u) {
    ws_k4_common(b, dm, u);
    const __m512i sh = WS_HALVES32(0, 0x00040004), m4 = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++)
        u->w[c] = _mm512_and_si512(_mm512_srlv_epi16(ws_bcast256(b + 16 + 32 * c), sh), m4);
}

WS_AI void ws_unpack_q5k(const uint8_t *b, const float *dm, ws_ublk *u) {
    ws_k4_common(b, dm, u);
    const __m512i sh = WS_HALVES32(0, 0x00040004), m4 = _mm512_set1_epi8(0x0F);
    const __m512i sixteen = _mm512_set1_epi8(16), qh = ws_bcast256(b + 16);
    for (int c = 0; c < 4; c++) {
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(ws_bcast256(b + 48 + 32 * c), sh), m4);
        const int lo = 1 << (2 * c), hi = 2 << (2 * c);
        const __mmask64 k = _mm512_test_epi8_mask(qh, WS_HALVES32(lo * 0x01010101, (int)(hi * 0x01010101u)));
        u->w[c] = _mm512_mask_add_epi8(q, k, q, sixteen);
    }
}

WS_AI void ws_unpack_q6k(const uint8_t *b, const float *dm, ws_ublk *u) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    const __m256i sw = _mm256_cvtepi8_epi16(sc);
    ws_spread16(_mm512_castsi256_si512(sw), u->s);
    u->m = _mm256_slli_epi16(sw, 5);   /* 32 sc_k: |.| <= 4096 */
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i sh0 = WS_HALVES32(0, 0x00020002), sh1 = WS_HALVES32(0x00040004, 0x00060006);
    for (int h = 0; h < 2; h++) {
        __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
        __asm__("" : "+v"(ql));   /* one load of ql, as ws_unpack_q2k's qs */
        const __m512i qh = ws_bcast256(b + 128 + 32 * h);
        /* zmm 2h + n: low nibble n of ql[64h..], top bits 2k of qh[32h..] (k = 2n, 2n + 1) */
        __m512i t = _mm512_slli_epi16(_mm512_srlv_epi16(qh, sh0), 4);
        u->w[2 * h] = _mm512_ternarylogic_epi32(t, m30, _mm512_and_si512(ql, m4), 0xEA);
        t = _mm512_slli_epi16(_mm512_srlv_epi16(qh, sh1), 4);
        u->w[2 * h + 1] = _mm512_ternarylogic_epi32(t, m30, _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), 0xEA);
    }
    ws_kq_set_d(dm, u);
}

/* dm[2j], dm[2j + 1] for block j < nblocks of w (consecutive blocks of one row): (d, dmin) as
   floats, an Inf made NaN (ws_inf_to_nan); Q3_K / Q6_K, which have no dmin: (d, d) (their
   constant term's factor 4 / 32 is in ws_ublk.m). ws_kq_rows_avx makes them for a row's
   blocks before unpacking them: one vector of 8 blocks' halves and one vcvtph2ps per 8 blocks instead of a
   broadcast, a conversion, the Inf fix-up and two permutes in every block's unpack (again for
   every activation tile); llvm-mca (sapphirerapids) puts a Q2_K block at n = 1 at 12.5 cycles,
   from 14.3. dm holds 2 * nblocks + 16 floats (whole groups of 8 blocks are written). With dx
   (one activation row's block scales, from block 0 of w; NULL for several rows) both are stored
   times dx, the products the block loop would make: two multiplies per block fewer at n = 1. */
#define WS_KQ_DM_CHUNK 64   /* blocks whose scales ws_kq_rows_avx converts at a time */

static inline void ws_kq_scales(int qtype, const uint8_t *w, int64_t nblocks, const float *dx, float *dm) {
    const int bb = ws_block_bytes(qtype);
    const int pair = qtype == WS_Q2_K || qtype == WS_Q4_K || qtype == WS_Q5_K;
    /* the 32 bits gathered per block: (d, dmin), or for the d-only types the 16 bits before d and
       d (d is the block's last field: reading past it could cross the end of the matrix) */
    const int off = qtype == WS_Q2_K ? 80 : qtype == WS_Q3_K ? 106 : qtype == WS_Q6_K ? 206 : 0;
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bb));
    for (int64_t j0 = 0; j0 < nblocks; j0 += 8) {
        /* 8 blocks' 32 bits as one vector: a whole group by 8 scalar loads put into lanes in
           registers (vmovd / vpinsrd: never a store read back as a vector, which stalls on store
           forwarding), a group's end by one masked gather. Zen 4's vpgatherdd cost a Q2_K decode
           block 1.2 cycles more than the loads (C harness, 15.6 -> 14.4; Q3_K..Q6_K 2-4%). */
        const int64_t m = nblocks - j0 < 8 ? nblocks - j0 : 8;
        const __mmask8 valid = (__mmask8)((1u << m) - 1u);
        const uint8_t *p = w + j0 * bb + off;
        __m256i raw;
        if (m == 8) {
            const __m128i lo = _mm_setr_epi32((int)ws_load_u32(p), (int)ws_load_u32(p + bb),
                                              (int)ws_load_u32(p + 2 * bb), (int)ws_load_u32(p + 3 * bb));
            const __m128i hi = _mm_setr_epi32((int)ws_load_u32(p + 4 * bb), (int)ws_load_u32(p + 5 * bb),
                                              (int)ws_load_u32(p + 6 * bb), (int)ws_load_u32(p + 7 * bb));
            raw = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        } else {
            raw = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), valid, idx, (const void *)p, 1);
        }
        if (!pair)   /* (d, d): d from the upper half into both */
            raw = _mm256_or_si256(_mm256_srli_epi32(raw, 16), _mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000u)));
        __m512 f = _mm512_cvtph_ps(raw);
        f = _mm512_add_ps(_mm512_sub_ps(f, f), f);   /* Inf -> NaN: ws_inf_to_nan */
        if (dx != NULL)   /* d and dmin times the block's dx */
            f = _mm512_mul_ps(f, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                                       _mm512_castps256_ps512(_mm256_maskz_loadu_ps(valid, dx + j0))));
        _mm512_storeu_ps(dm + 2 * j0, f);
    }
}

WS_AI void ws_kq_unpack(const int qtype, const uint8_t *blk, const float *bdm, ws_ublk *u) {
    switch (qtype) {
    case WS_Q2_K: ws_unpack_q2k(blk, bdm, u); break;
    case WS_Q3_K: ws_unpack_q3k(blk, bdm, u); break;
    case WS_Q4_K: ws_unpack_q4k(blk, bdm, u); break;
    case WS_Q5_K: ws_unpack_q5k(blk, bdm, u); break;
    default:      ws_unpack_q6k(blk, bdm, u); break;
    }
}

/* the unpacked block u times one activation row's 256 int8 x: 16 int32 partial sums (their total
   is the block's sum_k sc_k q'.x; a lane mixes sub-blocks). Q2_K: u holds q * sc already, one
   vpdpbusd per 64 codes. Others: vpdpbusd of the codes (<= 63) against x (|x| <= 127), 4 products
   a lane: |sum| <= 32004, so two zmm's int32 sums pack into int16 (vpackssdw, no saturation) and
   one vpdpwssd scales both, u->s[0..1] in the packed order (ws_spread16, ws_k4_common): 2 scale
   spreads and 2 vpdpwssd a block where vpmaddubsw + vpdpwssd per zmm took 4 + 4 + 4 (Zen 4,
   harness, cycles a warm decode block: Q3_K 23.3 -> 22.0, Q4_K 20.7 -> 19.0, Q5_K 26.9 -> 22.3,
   Q6_K 21.7 -> 20.3) */
WS_AI __m512i ws_kq_block_dot(const int qtype, const ws_ublk *u, const int8_t *x) {
    __m512i s;
    if (qtype == WS_Q2_K) {
        s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u->w[0], _mm512_loadu_si512((const void *)x));
        s = _mm512_dpbusd_epi32(s, u->w[1], _mm512_loadu_si512((const void *)(x + 64)));
        s = _mm512_dpbusd_epi32(s, u->w[2], _mm512_loadu_si512((const void *)(x + 128)));
        return _mm512_dpbusd_epi32(s, u->w[3], _mm512_loadu_si512((const void *)(x + 192)));
    }
    const __m512i z = _mm512_setzero_si512();
    __m512i p[4];
    for (int c = 0; c < 4; c++)
        p[c] = _mm512_dpbusd_epi32(z, u->w[c], _mm512_loadu_si512((const void *)(x + 64 * c)));
    s = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(p[0], p[1]), u->s[0]);
    return _mm512_dpwssd_epi32(s, _mm512_packs_epi32(p[2], p[3]), u->s[1]);
}

/* One block's sums for one activation row into its accumulators: s, the 16 int32 sums
   sum_k sc_k q'.x of ws_kq_block_dot, and the constant term from the row's int16 bsums: one
   vpmaddwd with the int16 factors m_k gives 8 int32 pair sums of m_k bsum_k, exact.
     Q3_K / Q6_K (m_k = 4 sc_k, 32 sc_k): subtracted from s's lower 8 lanes before its one
       conversion: acc += dd * float(s - M);
     Q2_K / Q4_K / Q5_K (m_k = the mins): acc += dd * float(s), accm += ddm * float(M), accm 8
       lanes (stored as acc - accm, lanes 8..15 of accm zero).
   dd = d dx, ddm = dmin dx. The float form this replaced (16 floats d bsum_k per block and row,
   g_k = dmin m_k as 16 floats per block, one 16-lane FMA) took 12 of a Q2_K block's 52 FP-pipe
   cycles on Zen 4 (llvm-mca znver4); this takes 5 (a ymm vpmaddwd, conversion and FMA). */
WS_AI void ws_kq_row_term(const int qtype, const ws_ublk *u, __m512i s, __m256i bsums, __m512 dd,
                          __m256 ddm, __m512 *acc, __m256 *accm) {
    const __m256i mm = _mm256_madd_epi16(u->m, bsums);
    if (ws_kq_fold(qtype)) {
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, _mm512_zextsi256_si512(mm))), dd, *acc);
    } else {
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd, *acc);
        *accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mm), ddm, *accm);
    }
}

/* acc - accm into 16 floats at p */
WS_AI void ws_kq_store_acc(float *p, __m512 acc, __m256 accm) {
    _mm512_storeu_ps(p, _mm512_sub_ps(acc, _mm512_zextps256_ps512(accm)));
}

/* nbk blocks of one weight row times nr activation rows: the 16-lane partial sums of row r go to
   accbuf + 16 r, added to what is there unless first. ws_kq_reduce16 sums the lanes once a
   group's rows are done: one reduction
   tree for 16 weight rows instead of a horizontal sum per row (~30 cycles a row: as much as
   three Q2_K blocks, the whole row of a 768-wide expert down projection).
   qtype and nr are compile-time constants at every call site, so the switches fold away. */
WS_AI void ws_kq_rows_avx(const int qtype, const uint8_t *w, int64_t nbk, const ws_kq_act *a,
                          const int nr, float *accbuf, int first, int64_t pf) {
    const int bb = ws_block_bytes(qtype);
    __m512 acc[WS_KQ_NRMAX];
    __m256 accm[WS_KQ_NRMAX];
    float dm[2 * WS_KQ_DM_CHUNK + 16] __attribute__((aligned(64)));
    for (int r = 0; r < nr; r++) {
        acc[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accbuf + 16 * r);
        accm[r] = _mm256_setzero_ps();
    }
    for (int64_t ib = 0; ib < nbk; ib++) {
        ws_ublk u;
        const uint8_t *blk = w + ib * bb;
        /* the row's block scales as floats, a chunk at a time, just before its blocks: the
           gather then finds the lines the prefetch below asked for a row earlier */
        if (ib % WS_KQ_DM_CHUNK == 0)
            ws_kq_scales(qtype, blk, nbk - ib < WS_KQ_DM_CHUNK ? nbk - ib : WS_KQ_DM_CHUNK,
                         nr == 1 ? a->dx + ib : NULL, dm);
        const float *bdm = dm + 2 * (ib % WS_KQ_DM_CHUNK);
        ws_kq_prefetch_ahead(blk, bb, pf);
        ws_kq_unpack(qtype, blk, bdm, &u);
        for (int r = 0; r < nr; r++) {
            const __m512i s = ws_kq_block_dot(qtype, &u, a->qx + r * a->qx_stride + 256 * ib);
            /* one activation row: d and dmin already hold d dx, dmin dx (ws_kq_scales; the same
               products) */
            const float dx = nr == 1 ? 1.0f : a->dx[r * a->dx_stride + ib];
            const __m512 dd = nr == 1 ? u.d : _mm512_mul_ps(u.d, _mm512_set1_ps(dx));
            const __m256 ddm = nr == 1 ? u.dmin : _mm256_mul_ps(u.dmin, _mm256_set1_ps(dx));
            ws_kq_row_term(qtype, &u, s, ws_kq_bsums(a, r, ib), dd, ddm, &acc[r], &accm[r]);
        }
    }
    for (int r = 0; r < nr; r++)
        ws_kq_store_acc(accbuf + 16 * r, acc[r], accm[r]);
}

/* One activation row (decode) times nrows whole weight rows of nbk blocks each, stored one after
   another (a row group): the rows read as one stream of nrows * nbk blocks, so the block scales
   come a gather of 8 blocks at a time across row ends (where a row of 3 blocks, a 768-wide
   expert's down projection, paid one per row), with no call, switch or accumulator set-up per
   row. The gather reads only blocks the prefetch has asked for: 64-block chunks (Q6_K: 13 KiB
   ahead) made a 4096x2048 Q4_K / Q6_K product 23-30% slower. Row r's 16 partial sums go to
   accbuf + r * acc_stride, with the bits ws_kq_rows_avx(..., nr = 1, first = 1) gives it: the
   same operations per block in the same order (the dx fold included: d * dx of the block's
   column). The chunk's dx come from a copy of the row's dx with its first 8 repeated past its
   end (dxrep[c] = dx[c mod nbk]): one vector load where a chunk crosses a row end, where eight
   scalar copies read back as one vector had stalled on store forwarding every chunk (~15% of a
   Q2_K expert's samples). Rows wider than WS_KQ_STREAM_MAXBK blocks go through ws_kq_rows_avx
   one row at a time (its bits, by the contract above). */
#define WS_KQ_STREAM_CHUNK 8
#define WS_KQ_STREAM_MAXBK 512
WS_AI void ws_kq_stream_avx(const int qtype, const uint8_t *w, int64_t nrows, int64_t nbk,
                            const ws_kq_act *a, float *accbuf, int64_t acc_stride) {
    const int bb = ws_block_bytes(qtype);
    if (nbk > WS_KQ_STREAM_MAXBK) {
        for (int64_t i = 0; i < nrows; i++)
            ws_kq_rows_avx(qtype, w + i * nbk * bb, nbk, a, 1, accbuf + i * acc_stride, 1, WS_KQ_PREFETCH);
        return;
    }
    const int64_t total = nrows * nbk;
    float dm[2 * WS_KQ_STREAM_CHUNK + 16] __attribute__((aligned(64)));
    float dxrep[WS_KQ_STREAM_MAXBK + WS_KQ_STREAM_CHUNK];   /* [nbk + 8]: dx[c mod nbk] */
    memcpy(dxrep, a->dx, (size_t)nbk * sizeof(float));
    for (int64_t c = nbk; c < nbk + WS_KQ_STREAM_CHUNK; c++)
        dxrep[c] = dxrep[c - nbk];
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    int64_t j = 0;   /* the block's column within its row */
    for (int64_t s0 = 0; s0 < total; s0 += WS_KQ_STREAM_CHUNK) {
        const int64_t cnt = total - s0 < WS_KQ_STREAM_CHUNK ? total - s0 : WS_KQ_STREAM_CHUNK;
        ws_kq_scales(qtype, w + s0 * bb, cnt, dxrep + j, dm);
        for (int64_t i = 0; i < cnt; i++) {
            const uint8_t *blk = w + (s0 + i) * bb;
            ws_ublk u;
            ws_kq_prefetch_ahead(blk, bb, WS_KQ_PREFETCH);
            ws_kq_unpack(qtype, blk, dm + 2 * i, &u);
            const __m512i s = ws_kq_block_dot(qtype, &u, a->qx + 256 * j);
            ws_kq_row_term(qtype, &u, s, ws_kq_bsums(a, 0, j), u.d, u.dmin, &acc, &accm);
            if (++j == nbk) {   /* the row's last block: its sums out, the next row's from zero */
                ws_kq_store_acc(accbuf, acc, accm);
                accbuf += acc_stride;
                acc = _mm512_setzero_ps();
                accm = _mm256_setzero_ps();
                j = 0;
            }
        }
    }
}

/* out[j] = the sum of the 16 floats at v + j * vstride, j < m <= 16 (sum16.h's tree) */
static inline void ws_kq_reduce16(const float *v, int64_t vstride, int m, float *out) {
    ws_sum16_rows(v, vstride, m, out);
}

#define WS_KQ_NR_CASES(QT) \
    switch (nr) { \
    case 1: ws_kq_rows_avx(QT, w, nbk, a, 1, accbuf, first, pf); break; \
    case 2: ws_kq_rows_avx(QT, w, nbk, a, 2, accbuf, first, pf); break; \
    case 3: ws_kq_rows_avx(QT, w, nbk, a, 3, accbuf, first, pf); break; \
    case 4: ws_kq_rows_avx(QT, w, nbk, a, 4, accbuf, first, pf); break; \
    case 5: ws_kq_rows_avx(QT, w, nbk, a, 5, accbuf, first, pf); break; \
    case 6: ws_kq_rows_avx(QT, w, nbk, a, 6, accbuf, first, pf); break; \
    case 7: ws_kq_rows_avx(QT, w, nbk, a, 7, accbuf, first, pf); break; \
    default: ws_kq_rows_avx(QT, w, nbk, a, 8, accbuf, first, pf); break; \
    }

#elif WS_KQ_AVX2

/* AVX2: the same sums per block as the AVX-512 path, 32 elements (two sub-blocks) per ymm:
 * chunk c = elements 32c..32c+31 in natural order (the activations' Q8_K order), vpmaddubsw
 * (u8 codes x s8 activations -> s16 pairs; at most 63 * 127 * 2, no saturation) then vpmaddwd
 * with the two sub-blocks' int16 scales (128-bit lane m of chunk c: sub-block 2c + m). A row's
 * partial sums are 8 floats: lanes 0..7 of its 16-float slot in accbuf (ws_kq_reduce16 sums
 * those 8). The min / constant term comes from the activations' int16 bsums (WS_KQ_BSUMS): one
 * vpmaddwd of them with 16 int16 factors m_k gives 8 int32 sums_k m_k bsum_k, exact.
 *   Q3_K / Q6_K (g_k = 4 d sc_k, 32 d sc_k): m = sc, and the term, times 4 or 32 (a shift), is
 *     subtracted from the block's int32 sum before its one conversion: t = d * float(S - 4M);
 *   Q2_K / Q4_K / Q5_K (g_k = dmin min_k): m = the mins, t = d * float(S) - dmin * float(M);
 * then acc += dx * t, one FMA a row and block.
 * Every activation-row count gives each row the same bits: the same operations per row in the
 * same order. */

typedef struct {
    __m256i w[8];   /* unsigned codes q', chunk c */
    __m256i s[8];   /* int16 sub-block scales: lane m of chunk c holds sub-block 2c + m's */
    __m256i m;      /* int16 constant-term factors m_k (above), k = 0..15 */
    float d, dmin;  /* dmin: Q2_K / Q4_K / Q5_K only */
} ws_ublk2;

/* shuffle controls: within each 128-bit lane, broadcast one int16 of the source lane:
   chunk c's scales are words 2c and 2c + 1 of the 16 (c < 4: the low half of the words, else
   the high half), lane 0 takes word 2(c % 4), lane 1 word 2(c % 4) + 1 */
static const uint8_t ws_kq2_sc_ctl[4][32] __attribute__((aligned(32))) = {
#define WS_KQ2_W(a) (a), (a) + 1, (a), (a) + 1, (a), (a) + 1, (a), (a) + 1, (a), (a) + 1, (a), (a) + 1, (a), (a) + 1, (a), (a) + 1
    {WS_KQ2_W(0), WS_KQ2_W(2)}, {WS_KQ2_W(4), WS_KQ2_W(6)}, {WS_KQ2_W(8), WS_KQ2_W(10)}, {WS_KQ2_W(12), WS_KQ2_W(14)},
#undef WS_KQ2_W
};

WS_AI __m256i ws_ld256(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* the 16 sub-block scales (int16, in the low and high halves of sw) spread to the 8 chunks */
WS_AI void ws_kq2_spread(__m256i sw, __m256i s[8]) {
    const __m256i lo = _mm256_permute2x128_si256(sw, sw, 0x00), hi = _mm256_permute2x128_si256(sw, sw, 0x11);
    for (int c = 0; c < 4; c++) {
        const __m256i ctl = _mm256_load_si256((const __m256i *)ws_kq2_sc_ctl[c]);
        s[c] = _mm256_shuffle_epi8(lo, ctl);
        s[c + 4] = _mm256_shuffle_epi8(hi, ctl);
    }
}

WS_AI float ws_kq2_half(const uint8_t *p) {   /* fp16 -> float, Inf made NaN (ws_inf_to_nan) */
    return ws_inf_to_nan(_cvtsh_ss(ws_load_u16(p)));
}

/* u->d and u->dmin from the fp16 pair (d, dmin) at p, Infs made NaN: one load and one
   conversion for both (llvm-mca, znver3: a Q2_K block 26 -> 23 cycles) */
WS_AI void ws_kq2_d_dmin(const uint8_t *p, ws_ublk2 *u) {
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)ws_load_u32(p)));
    const __m128 dm = _mm_add_ps(_mm_sub_ps(v, v), v);
    u->d = _mm_cvtss_f32(dm);
    u->dmin = _mm_cvtss_f32(_mm_movehdup_ps(dm));
}

/* 2-bit planes (Q2_K, Q3_K's low bits): chunk c = plane c % 4 of the 32 bytes at qs + 32 (c / 4) */
WS_AI void ws_kq2_planes(const uint8_t *qs, __m256i w[8]) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const __m256i v = ws_ld256(qs + 32 * h);
        for (int j = 0; j < 4; j++)
            w[4 * h + j] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m3);
    }
}

/* bits [from, from + width) of each byte of v moved to bits [to, to + width), the rest zero: a
   mask, then one 16-bit shift (none when from == to); masking first keeps each byte's bits from
   crossing into its neighbour */
WS_AI __m256i ws_kq2_bits(__m256i v, int from, int width, int to) {
    const __m256i m = _mm256_and_si256(v, _mm256_set1_epi8((char)(((1 << width) - 1) << from)));
    return from == to ? m : from > to ? _mm256_srli_epi16(m, from - to) : _mm256_slli_epi16(m, to - from);
}

WS_AI void ws_unpack2_q2k(const uint8_t *b, ws_ublk2 *u) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)b);
    ws_kq2_spread(_mm256_cvtepu8_epi16(_mm_and_si128(sc, _mm_set1_epi8(15))), u->s);
    u->m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15)));
    ws_kq2_d_dmin(b + 80, u);
    ws_kq2_planes(b + 16, u->w);
}

WS_AI void ws_unpack2_q3k(const uint8_t *b, ws_ublk2 *u) {
    uint32_t aux[4];
    ws_kq_q3_scales(b + 96, aux);
    const __m128i sc = _mm_sub_epi8(ws_u32x4(aux), _mm_set1_epi8(32));
    u->m = _mm256_cvtepi8_epi16(sc);
    ws_kq2_spread(u->m, u->s);
    u->d = ws_kq2_half(b + 108);
    ws_kq2_planes(b + 32, u->w);
    const __m256i hm = ws_ld256(b);
    for (int c = 0; c < 8; c++)
        u->w[c] = _mm256_or_si256(u->w[c], ws_kq2_bits(hm, c, 1, 2));
}

/* Q4_K / Q5_K: 8 scales and 8 mins, each for a 32-element chunk (two sub-blocks) */
WS_AI void ws_kq2_k4_common(const uint8_t *b, ws_ublk2 *u) {
    uint32_t sm[4];
    ws_kq_k4_scales(b + 4, sm);
    const __m128i v = ws_u32x4(sm);
    /* bytes 0..7 scales, 8..15 mins: each repeated for its chunk's two sub-blocks */
    const __m128i sc = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m128i mins = _mm_shuffle_epi8(v, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15));
    ws_kq2_spread(_mm256_cvtepu8_epi16(sc), u->s);
    u->m = _mm256_cvtepu8_epi16(mins);
    ws_kq2_d_dmin(b, u);
}

WS_AI void ws_unpack2_q4k(const uint8_t *b, ws_ublk2 *u) {
    ws_kq2_k4_common(b, u);
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int h = 0; h < 4; h++) {
        const __m256i v = ws_ld256(b + 16 + 32 * h);
        u->w[2 * h] = _mm256_and_si256(v, m4);
        u->w[2 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
}

WS_AI void ws_unpack2_q5k(const uint8_t *b, ws_ublk2 *u) {
    ws_kq2_k4_common(b, u);
    const __m256i m4 = _mm256_set1_epi8(15), qh = ws_ld256(b + 16);
    for (int h = 0; h < 4; h++) {
        const __m256i v = ws_ld256(b + 48 + 32 * h);
        u->w[2 * h] = _mm256_or_si256(_mm256_and_si256(v, m4), ws_kq2_bits(qh, 2 * h, 1, 4));
        u->w[2 * h + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), ws_kq2_bits(qh, 2 * h + 1, 1, 4));
    }
}

WS_AI void ws_unpack2_q6k(const uint8_t *b, ws_ublk2 *u) {
    u->m = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
    ws_kq2_spread(u->m, u->s);
    u->d = ws_kq2_half(b + 208);
    for (int h = 0; h < 2; h++) {   /* chunk 4h + kk: nibble kk / 2 of ql[64h + 32 (kk % 2)..], bits 2kk of qh[32h..] */
        const __m256i ql0 = ws_ld256(b + 64 * h), ql1 = ws_ld256(b + 64 * h + 32), qh = ws_ld256(b + 128 + 32 * h);
        for (int kk = 0; kk < 4; kk++)
            u->w[4 * h + kk] = _mm256_or_si256(ws_kq2_bits(kk % 2 ? ql1 : ql0, 4 * (kk / 2), 4, 0), ws_kq2_bits(qh, 2 * kk, 2, 4));
    }
}

WS_AI void ws_kq2_unpack(const int qtype, const uint8_t *blk, ws_ublk2 *u) {
    switch (qtype) {
    case WS_Q2_K: ws_unpack2_q2k(blk, u); break;
    case WS_Q3_K: ws_unpack2_q3k(blk, u); break;
    case WS_Q4_K: ws_unpack2_q4k(blk, u); break;
    case WS_Q5_K: ws_unpack2_q5k(blk, u); break;
    default:      ws_unpack2_q6k(blk, u); break;
    }
}

/* the unpacked block times one activation row's 256 int8: 8 int32 partial sums (a pairwise
   tree over the chunks: short dependency chains) */
WS_AI __m256i ws_kq2_block_dot(const ws_ublk2 *u, const int8_t *x) {
    __m256i p[8];
    for (int c = 0; c < 8; c++)
        p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(u->w[c], _mm256_loadu_si256((const __m256i *)(x + 32 * c))), u->s[c]);
    for (int c = 0; c < 4; c++)
        p[c] = _mm256_add_epi32(p[c], p[c + 4]);
    return _mm256_add_epi32(_mm256_add_epi32(p[0], p[2]), _mm256_add_epi32(p[1], p[3]));
}

/* The unpacked block times nr >= 2 activation rows' 256 int8 at x + r * stride: row r's 8
   int32 partial sums in p[r], the same integers in the same lanes as ws_kq2_block_dot gives
   (integer sums, no overflow: the same bits). Chunk by chunk, each chunk's codes and scales
   loaded once for all the rows: the unpacked block does not fit the 16 ymm registers, and row
   by row reloaded it per row (llvm-mca, znver3, Q4_K: the load pipes the limit, 13.5 cycles a
   row). Q2_K's codes arrive already times their sub-block's scale (at most 15 * 3 = 45, still
   an unsigned byte: 8 vpmullw a block for all the rows): two chunks' int16 products added
   (|sum| <= 4 * 45 * 128 = 23040) and widened by one vpmaddwd by ones, 12 multiplies a row
   instead of 16. */
WS_AI void ws_kq2_tile_dot(const ws_ublk2 *u, const int scaled, const int8_t *x, const int64_t stride,
                           const int nr, __m256i *p) {
    if (scaled) {
        const __m256i ones = _mm256_set1_epi16(1);
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
            _Pragma("GCC unroll 6") for (int r = 0; r < nr; r++) {
                const int8_t *xr = x + r * stride + 32 * c;
                const __m256i t = _mm256_madd_epi16(_mm256_add_epi16(
                    _mm256_maddubs_epi16(u->w[c], _mm256_loadu_si256((const __m256i *)xr)),
                    _mm256_maddubs_epi16(u->w[c + 4], _mm256_loadu_si256((const __m256i *)(xr + 128)))), ones);
                p[r] = c ? _mm256_add_epi32(p[r], t) : t;
                __asm__("" : "+x"(p[r]));   /* see below */
            }
    } else {
        _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++)
            _Pragma("GCC unroll 6") for (int r = 0; r < nr; r++) {
                const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(
                    u->w[c], _mm256_loadu_si256((const __m256i *)(x + r * stride + 32 * c))), u->s[c]);
                p[r] = c ? _mm256_add_epi32(p[r], t) : t;
                /* the sum stays a chain in this order: GCC reassociated the exact integer adds into
                   one tree per row after all of a block's products, which lived on the stack
                   (llvm-mca, znver3, Q4_K 6 rows: 115 stack accesses a block) */
                __asm__("" : "+x"(p[r]));
            }
    }
}

/* Row r's block term into its accumulator (see above): t = d * float(S) - dmin * float(M), or
   d * float(S - 2^fold M); acc += dx * t, dx broadcast from memory (a load, no vector op): 6
   vector ops a row and block, where d * dx and dmin * dx each as a product then an FMA took 8 */
WS_AI __m256 ws_kq2_row_term(const ws_ublk2 *u, const int fold, const ws_kq_act *a, const int r,
                             const int64_t ib, const __m256i s, const __m256 acc) {
    const __m256 dv = _mm256_set1_ps(u->d), dminv = _mm256_set1_ps(u->dmin);
    const __m256i pm = _mm256_madd_epi16(u->m, ws_kq_bsums(a, r, ib));
    const __m256 t = fold ? _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, _mm256_slli_epi32(pm, fold))), dv)
                          : _mm256_fnmadd_ps(_mm256_cvtepi32_ps(pm), dminv, _mm256_mul_ps(_mm256_cvtepi32_ps(s), dv));
    return _mm256_fmadd_ps(t, _mm256_broadcast_ss(a->dx + r * a->dx_stride + ib), acc);
}

/* Rows r0..r0+n-1 of a tile (n = 2 or 3): their sums (ws_kq2_tile_dot), then at once their
   terms into acc: a sub-tile's int32 sums, one chunk's codes and scales and a temporary stay in
   the 16 registers; with every row's sums kept to the end of the block they lived on the stack
   (llvm-mca, znver3, Q4_K 6 rows: 115 stack accesses a block, bound by the load / store pipes). */
WS_AI void ws_kq2_subtile(const ws_ublk2 *u, const int scaled, const int fold, const ws_kq_act *a,
                          const int64_t ib, const int r0, const int n, __m256 *acc) {
    __m256i p[3];
    ws_kq2_tile_dot(u, scaled, a->qx + r0 * a->qx_stride + 256 * ib, a->qx_stride, n, p);
    for (int r = 0; r < n; r++)
        acc[r0 + r] = ws_kq2_row_term(u, fold, a, r0 + r, ib, p[r], acc[r0 + r]);
}

/* a tile of 2 <= nr <= 6 rows in sub-tiles of 3 and 2 rows (6 = 3 + 3, 5 = 3 + 2, 4 = 2 + 2);
   each call has constant row counts (GCC unrolls those) */
WS_AI void ws_kq2_tile_rows(const ws_ublk2 *u, const int scaled, const int fold, const ws_kq_act *a,
                            const int64_t ib, const int nr, __m256 *acc) {
    switch (nr) {
    case 2: ws_kq2_subtile(u, scaled, fold, a, ib, 0, 2, acc); break;
    case 3: ws_kq2_subtile(u, scaled, fold, a, ib, 0, 3, acc); break;
    case 4: ws_kq2_subtile(u, scaled, fold, a, ib, 0, 2, acc); ws_kq2_subtile(u, scaled, fold, a, ib, 2, 2, acc); break;
    case 5: ws_kq2_subtile(u, scaled, fold, a, ib, 0, 3, acc); ws_kq2_subtile(u, scaled, fold, a, ib, 3, 2, acc); break;
    default: ws_kq2_subtile(u, scaled, fold, a, ib, 0, 3, acc); ws_kq2_subtile(u, scaled, fold, a, ib, 3, 3, acc); break;
    }
}

/* nbk blocks of one weight row times nr activation rows (ws_kq_rows_avx's contract, 8 lanes):
   one row by ws_kq2_block_dot (a tree: the shortest chain), more by ws_kq2_tile_rows. */
WS_AI void ws_kq_rows_avx2(const int qtype, const uint8_t *w, int64_t nbk, const ws_kq_act *a,
                           const int nr, float *accbuf, int first, int64_t pf) {
    const int bb = ws_block_bytes(qtype);
    const int scaled = qtype == WS_Q2_K && nr >= 2;
    const int fold = ws_kq_fold(qtype);
    __m256 acc[WS_KQ_NRMAX];
    /* zero from a register GCC cannot see is zero: with a constant it made these loops a memset
       call a call (1.5% of a 30B-A3B prompt's time, perf) */
    __m256 zero = _mm256_setzero_ps();
    __asm__("" : "+x"(zero));
    for (int r = 0; r < nr; r++)
        acc[r] = first ? zero : _mm256_loadu_ps(accbuf + 16 * r);
    for (int64_t ib = 0; ib < nbk; ib++) {
        const uint8_t *blk = w + ib * bb;
        ws_kq_prefetch_ahead(blk, bb, pf);
        ws_ublk2 u;
        ws_kq2_unpack(qtype, blk, &u);
        if (nr == 1) {
            acc[0] = ws_kq2_row_term(&u, fold, a, 0, ib, ws_kq2_block_dot(&u, a->qx + 256 * ib), acc[0]);
        } else {
            if (scaled)   /* 16-bit products: a byte's code times its scale stays in the byte */
                for (int c = 0; c < 8; c++)
                    u.w[c] = _mm256_mullo_epi16(u.w[c], u.s[c]);
            ws_kq2_tile_rows(&u, scaled, fold, a, ib, nr, acc);
        }
    }
    for (int r = 0; r < nr; r++)
        _mm256_storeu_ps(accbuf + 16 * r, acc[r]);
}

/* out[j] = the sum of the 8 partial sums at v + j * vstride, j < m (ws_hsum8's order), 8 rows
   at a time */
static inline void ws_kq_reduce16(const float *v, int64_t vstride, int m, float *out) {
    for (int j = 0; j < m; j += 8)
        ws_sum8_rows(v + j * vstride, vstride, m - j < 8 ? m - j : 8, out + j);
}

#define WS_KQ2_NR_CASES(QT) \
    switch (nr) { \
    case 1: ws_kq_rows_avx2(QT, w, nbk, a, 1, accbuf, first, pf); break; \
    case 2: ws_kq_rows_avx2(QT, w, nbk, a, 2, accbuf, first, pf); break; \
    case 3: ws_kq_rows_avx2(QT, w, nbk, a, 3, accbuf, first, pf); break; \
    case 4: ws_kq_rows_avx2(QT, w, nbk, a, 4, accbuf, first, pf); break; \
    case 5: ws_kq_rows_avx2(QT, w, nbk, a, 5, accbuf, first, pf); break; \
    default: ws_kq_rows_avx2(QT, w, nbk, a, 6, accbuf, first, pf); break; \
    }

#else  /* portable scalar path */

typedef struct {
    uint8_t q[256];     /* unsigned codes q' */
    int32_t sc[16];     /* per 16-element sub-block */
    float d;
    float g[16];
} ws_sblk;

static void ws_unpack_scalar(int qtype, const uint8_t *b, ws_sblk *u) {
    int k, i;
    switch (qtype) {
    case WS_Q2_K: {
        float dmin = ws_inf_to_nan(ws_half_at(b + 82));
        u->d = ws_inf_to_nan(ws_half_at(b + 80));
        for (k = 0; k < 16; k++) { u->sc[k] = b[k] & 15; u->g[k] = dmin * (float)(b[k] >> 4); }
        for (i = 0; i < 256; i++)
            u->q[i] = (b[16 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
        break;
    }
    case WS_Q3_K: {
        uint32_t aux[4];
        uint8_t s[16];
        ws_kq_q3_scales(b + 96, aux);
        memcpy(s, aux, 16);
        u->d = ws_inf_to_nan(ws_half_at(b + 108));
        for (k = 0; k < 16; k++) { u->sc[k] = (int)s[k] - 32; u->g[k] = 4.0f * u->d * (float)u->sc[k]; }
        for (i = 0; i < 256; i++) {
            int low = (b[32 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
            int hbit = (b[i % 32] >> (i / 32)) & 1;
            u->q[i] = (uint8_t)(low + 4 * hbit);
        }
        break;
    }
    case WS_Q4_K:
    case WS_Q5_K: {
        uint32_t sm[4];
        uint8_t s[16];
        const uint8_t *qs = b + (qtype == WS_Q4_K ? 16 : 48);
        float dmin = ws_inf_to_nan(ws_half_at(b + 2));
        ws_kq_k4_scales(b + 4, sm);
        memcpy(s, sm, 16);
        u->d = ws_inf_to_nan(ws_half_at(b));
        for (k = 0; k < 16; k++) { u->sc[k] = s[k / 2]; u->g[k] = dmin * (float)s[8 + k / 2]; }
        for (i = 0; i < 256; i++) {
            int q = (qs[32 * (i / 64) + i % 32] >> (4 * ((i / 32) % 2))) & 15;
            if (qtype == WS_Q5_K) q |= ((b[16 + i % 32] >> (i / 32)) & 1) << 4;
            u->q[i] = (uint8_t)q;
        }
        break;
    }
    default: {  /* Q6_K */
        u->d = ws_inf_to_nan(ws_half_at(b + 208));
        for (k = 0; k < 16; k++) { u->sc[k] = (int8_t)b[192 + k]; u->g[k] = 32.0f * u->d * (float)u->sc[k]; }
        for (i = 0; i < 256; i++) {
            int h = i / 128, kk = (i / 32) % 4, l = i % 32;
            int low = (b[64 * h + 32 * (kk % 2) + l] >> (4 * (kk / 2))) & 15;
            int high = (b[128 + 32 * h + l] >> (2 * kk)) & 3;
            u->q[i] = (uint8_t)(low | (high << 4));
        }
        break;
    }
    }
}

static void ws_kq_rows_scalar(int qtype, const uint8_t *w, int64_t nbk, const ws_kq_act *a,
                              int nr, float *accbuf, int first) {
    const int bb = ws_block_bytes(qtype);
    float acc[WS_KQ_NRMAX];
    ws_sblk u;
    for (int r = 0; r < nr; r++) acc[r] = first ? 0.0f : accbuf[16 * r];
    for (int64_t ib = 0; ib < nbk; ib++) {
        ws_unpack_scalar(qtype, w + ib * bb, &u);
        for (int r = 0; r < nr; r++) {
            const int8_t *x = a->qx + r * a->qx_stride + 256 * ib;
            const float *f = a->fb + r * a->fb_stride + 16 * ib;
            int32_t s = 0;
            float m = 0.0f;
            for (int k = 0; k < 16; k++) {
                int32_t p = 0;
                for (int i = 0; i < 16; i++) p += (int32_t)u.q[16 * k + i] * x[16 * k + i];
                s += u.sc[k] * p;
                m += u.g[k] * f[k];
            }
            acc[r] += u.d * a->dx[r * a->dx_stride + ib] * (float)s - m;
        }
    }
    for (int r = 0; r < nr; r++) {   /* lane 0 holds the sum, the others zeros (ws_kq_reduce16) */
        accbuf[16 * r] = acc[r];
        for (int l = 1; l < 16; l++) accbuf[16 * r + l] = 0.0f;
    }
}

/* out[j] = the sum of the 16 floats at v + j * vstride, j < m (lane order) */
static inline void ws_kq_reduce16(const float *v, int64_t vstride, int m, float *out) {
    for (int j = 0; j < m; j++) {
        float t = 0.0f;
        for (int l = 0; l < 16; l++) t += v[j * vstride + l];
        out[j] = t;
    }
}

#endif

/* W_row . x_r over nbk blocks for r < nr (1..WS_KQ_NRMAX), as ws_kq_rows_avx above: accbuf holds
   16 partial sums per activation row, summed by ws_kq_reduce16 once the row's blocks are done
   (the scalar path keeps its sum in lane 0, zeros in the others). pf: the bytes from each block
   to the one prefetched with it: WS_KQ_PREFETCH where the caller's rows are read whole one after
   another, the row stride where it reads them a block range at a time (the next row's range is
   what it reads next; WS_KQ_PREFETCH there fetched lines of later ranges, and each range's
   first lines came cold: a Q3_K 4096 x 14336 product, 6 rows, took 9.3 ms cut in ranges, 5.8
   whole, Zen 4). */
static void ws_kq_rows(int qtype, const uint8_t *w, int64_t nbk, const ws_kq_act *a, int nr,
                       float *accbuf, int first, int64_t pf) {
#if WS_KQ_AVX512
    switch (qtype) {
    case WS_Q2_K: WS_KQ_NR_CASES(WS_Q2_K); break;
    case WS_Q3_K: WS_KQ_NR_CASES(WS_Q3_K); break;
    case WS_Q4_K: WS_KQ_NR_CASES(WS_Q4_K); break;
    case WS_Q5_K: WS_KQ_NR_CASES(WS_Q5_K); break;
    default:      WS_KQ_NR_CASES(WS_Q6_K); break;
    }
#elif WS_KQ_AVX2
    switch (qtype) {
    case WS_Q2_K: WS_KQ2_NR_CASES(WS_Q2_K); break;
    case WS_Q3_K: WS_KQ2_NR_CASES(WS_Q3_K); break;
    case WS_Q4_K: WS_KQ2_NR_CASES(WS_Q4_K); break;
    case WS_Q5_K: WS_KQ2_NR_CASES(WS_Q5_K); break;
    default:      WS_KQ2_NR_CASES(WS_Q6_K); break;
    }
#else
    (void)pf;
    ws_kq_rows_scalar(qtype, w, nbk, a, nr, accbuf, first);
#endif
}

/* ws_kq_stream_avx's contract on any build: one activation row, rows i < nrows of nbk blocks at
   w + i * nbk * block bytes, row i's partial sums (ws_kq_reduce16's input) at accbuf + i * acc_stride */
static void ws_kq_stream(int qtype, const uint8_t *w, int64_t nrows, int64_t nbk, const ws_kq_act *a,
                         float *accbuf, int64_t acc_stride) {
#if WS_KQ_AVX512
    switch (qtype) {
    case WS_Q2_K: ws_kq_stream_avx(WS_Q2_K, w, nrows, nbk, a, accbuf, acc_stride); break;
    case WS_Q3_K: ws_kq_stream_avx(WS_Q3_K, w, nrows, nbk, a, accbuf, acc_stride); break;
    case WS_Q4_K: ws_kq_stream_avx(WS_Q4_K, w, nrows, nbk, a, accbuf, acc_stride); break;
    case WS_Q5_K: ws_kq_stream_avx(WS_Q5_K, w, nrows, nbk, a, accbuf, acc_stride); break;
    default:      ws_kq_stream_avx(WS_Q6_K, w, nrows, nbk, a, accbuf, acc_stride); break;
    }
#else   /* AVX2 / scalar: row by row (the same bits as ws_kq_rows with one activation row) */
    const int64_t row_bytes = nbk * ws_block_bytes(qtype);
    for (int64_t i = 0; i < nrows; i++)
        ws_kq_rows(qtype, w + i * row_bytes, nbk, a, 1, accbuf + i * acc_stride, 1, WS_KQ_PREFETCH);
#endif
}

#endif /* WS_KQUANTS_SIMD_H */
