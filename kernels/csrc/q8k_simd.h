/* Q8_K quantization of one activation row (kernels/_kquants.pyx), AVX-512, AVX2 or portable C.
 *
 * ggml's quantize_row_q8_K_ref per 256 values: the value of largest magnitude (the first on ties)
 * maps to -127, q = nearest_int(iscale * x) (round half to even), capped at 127, d = 1 / iscale;
 * here also each block's min-term slot fb (16 floats, kquants_simd.h's WS_KQ_BSUMS): AVX-512 and
 * AVX2 builds the int16 bsum_k in its first 32 bytes, portable builds fb[k] = d * bsum_k as float,
 * with bsum_k the sum of the 16 quants of sub-block k. Every path gives the same bits (tests/test_kquants_cython.py against
 * weightstream.kernels.quantize.quantize_q8_k): the products iscale * x are the same float
 * multiplications, vcvtps2dq rounds half to even as rintf does under the default rounding mode,
 * and the sums are exact integers.
 *
 * Why vectorised: the scalar loop carried two dependencies per element (the running absmax and the
 * NaN check's float sum), ~12 cycles an element: 8 us of a 60 us 768x2048 Q2_K decode product,
 * on one thread while the others wait.
 *
 * permuted: each block's quants stored in the Q2_K kernel's order (WS_KQ_PERMUTED): element
 * 128h + 32j + l at position 64j + 32h + l. Returns 1 when the row holds a NaN or an Inf (which the
 * int8 quants lose; see ws_nan_rows). */
#ifndef WS_Q8K_SIMD_H
#define WS_Q8K_SIMD_H

#include "common.h"
#include "kquants_simd.h"   /* WS_KQ_AVX512 / WS_KQ_AVX2 and their intrinsics */
#include <math.h>

/* an all-zero block: zero quants (in any order), d and min-term sums */
static inline void ws_q8k_zero_block(int8_t *qb, float *d, float *fb) {
    *d = 0.0f;
    memset(qb, 0, 256);
    memset(fb, 0, 16 * sizeof(float));
}

#if WS_KQ_AVX512

static inline int ws_quantize_row_q8k(const float *x, int64_t nb, int8_t *qs, float *d, float *fb,
                                      int permuted) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    const __m512i expmask = _mm512_set1_epi32(0x7F800000);
    __mmask16 bad = 0;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 256 * b;
        int8_t *qb = qs + 256 * b;
        /* the largest magnitude (NaN skipped: max_ps returns its second operand on a NaN) */
        __m512 amax16 = _mm512_setzero_ps();
        for (int j = 0; j < 256; j += 16) {
            const __m512 v = _mm512_loadu_ps(xb + j);
            bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), expmask), expmask);
            amax16 = _mm512_max_ps(_mm512_and_ps(v, absmask), amax16);
        }
        const float amax = _mm512_reduce_max_ps(amax16);
        if (amax == 0.0f) {
            ws_q8k_zero_block(qb, d + b, fb + 16 * b);
            continue;
        }
        /* the first value of that magnitude, with its sign */
        float vmax = 0.0f;
        const __m512 am = _mm512_set1_ps(amax);
        for (int j = 0; j < 256; j += 16) {
            const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_and_ps(_mm512_loadu_ps(xb + j), absmask), am);
            if (hit) {
                vmax = xb[j + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / vmax;
        const float db = 1.0f / iscale;
        const __m512 is = _mm512_set1_ps(iscale);
        const __m512i cap = _mm512_set1_epi32(127);
        d[b] = db;
        for (int k = 0; k < 16; k++) {   /* sub-block k: 16 quants, their sum */
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(is, _mm512_loadu_ps(xb + 16 * k)));
            q = _mm512_min_epi32(q, cap);
            const __m128i q8 = _mm512_cvtepi32_epi8(q);
            const int pos = permuted ? 64 * (k % 8 / 2) + 32 * (k / 8) + 16 * (k % 2) : 16 * k;
            _mm_storeu_si128((__m128i *)(qb + pos), q8);
            /* the sum of the stored int8s (a NaN's integer indefinite truncates to 0, as in C) */
            ((int16_t *)(fb + 16 * b))[k] = (int16_t)_mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q8));   /* WS_KQ_BSUMS */
        }
    }
    return bad != 0;
}

#elif WS_KQ_AVX2

/* 16 int32 (a: elements 0..7, b: 8..15) -> their low bytes, in order: C's (int8_t) conversion
   (a NaN's integer indefinite becomes 0, as in the scalar path; a saturating pack would give -128) */
static inline __m128i ws_q8k_low_bytes(__m256i a, __m256i b) {
    const __m256i lo = _mm256_set1_epi32(0xFF);
    const __m256i t = _mm256_packus_epi32(_mm256_and_si256(a, lo), _mm256_and_si256(b, lo));   /* a0-3 b0-3 | a4-7 b4-7 */
    const __m256i u = _mm256_packus_epi16(t, t);
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(u, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0)));
}

static inline int ws_quantize_row_q8k(const float *x, int64_t nb, int8_t *qs, float *d, float *fb,
                                      int permuted) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i expmask = _mm256_set1_epi32(0x7F800000);
    __m256i bad = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 256 * b;
        int8_t *qb = qs + 256 * b;
        /* the largest magnitude (NaN skipped: max_ps returns its second operand on a NaN) */
        __m256 amax8 = _mm256_setzero_ps();
        for (int j = 0; j < 256; j += 8) {
            const __m256 v = _mm256_loadu_ps(xb + j);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), expmask), expmask));
            amax8 = _mm256_max_ps(_mm256_and_ps(v, absmask), amax8);
        }
        const float amax = ws_hmax8(amax8);
        if (amax == 0.0f) {
            ws_q8k_zero_block(qb, d + b, fb + 16 * b);
            continue;
        }
        /* the first value of that magnitude, with its sign */
        float vmax = 0.0f;
        const __m256 am = _mm256_set1_ps(amax);
        for (int j = 0; j < 256; j += 8) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(xb + j), absmask), am, _CMP_EQ_OQ));
            if (hit) {
                vmax = xb[j + __builtin_ctz((unsigned)hit)];
                break;
            }
        }
        const float iscale = -127.0f / vmax;
        const float db = 1.0f / iscale;
        const __m256 is = _mm256_set1_ps(iscale);
        const __m256i cap = _mm256_set1_epi32(127);
        d[b] = db;
        for (int k = 0; k < 16; k++) {   /* sub-block k: 16 quants, their sum */
            const __m256i q0 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(is, _mm256_loadu_ps(xb + 16 * k))), cap);
            const __m256i q1 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(is, _mm256_loadu_ps(xb + 16 * k + 8))), cap);
            const __m128i q8 = ws_q8k_low_bytes(q0, q1);
            const int pos = permuted ? 64 * (k % 8 / 2) + 32 * (k / 8) + 16 * (k % 2) : 16 * k;
            _mm_storeu_si128((__m128i *)(qb + pos), q8);
            /* the sum of the stored int8s: psadbw of the bytes biased to unsigned, less 16 * 128 */
            const __m128i sad = _mm_sad_epu8(_mm_xor_si128(q8, _mm_set1_epi8((char)0x80)), _mm_setzero_si128());
            const int sum = _mm_cvtsi128_si32(sad) + _mm_extract_epi16(sad, 4) - 16 * 128;
            ((int16_t *)(fb + 16 * b))[k] = (int16_t)sum;   /* WS_KQ_BSUMS */
        }
    }
    return !_mm256_testz_si256(bad, bad);
}

#else

static inline int ws_quantize_row_q8k(const float *x, int64_t nb, int8_t *qs, float *d, float *fb,
                                      int permuted) {
    int bad = 0;
    int8_t tmp[256];
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 256 * b;
        int8_t *qb = permuted ? tmp : qs + 256 * b;
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < 256; j++) {
            const float ax = fabsf(xb[j]);
            bad |= !isfinite(xb[j]);
            if (ax > amax) { amax = ax; vmax = xb[j]; }
        }
        if (amax == 0.0f) {
            ws_q8k_zero_block(qs + 256 * b, d + b, fb + 16 * b);
            continue;
        }
        const float iscale = -127.0f / vmax;
        const float db = 1.0f / iscale;
        d[b] = db;
        for (int j = 0; j < 256; j++) {
            const float r = rintf(iscale * xb[j]);
            const int v = r != r ? INT32_MIN : (int)r;   /* NaN: vcvtps2dq's integer indefinite */
            qb[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int k = 0; k < 16; k++) {
            int32_t s = 0;
            for (int j = 0; j < 16; j++) s += qb[16 * k + j];
            fb[16 * b + k] = db * (float)s;
        }
        if (permuted)
            for (int j = 0; j < 256; j++)
                qs[256 * b + 64 * ((j / 32) % 4) + 32 * (j / 128) + j % 32] = tmp[j];
    }
    return bad;
}

#endif

#endif /* WS_Q8K_SIMD_H */
