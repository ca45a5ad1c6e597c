/* Q8_K quantization of one activation row (kernels/_kquants.pyx), AVX-512 or portable C.
 *
 * ggml's quantize_row_q8_K_ref per 256 values: the value of largest magnitude (the first on ties)
 * maps to -127, q = nearest_int(iscale * x) (round half to even), capped at 127, d = 1 / iscale;
 * here also fb[k] = d * (sum of the 16 quants of sub-block k) as float, the k-quant kernels' min
 * term. Both paths give the same bits (tests/test_kquants_cython.py against
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
#include "kquants_simd.h"   /* WS_KQ_AVX512 and its intrinsics */
#include <math.h>

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
            d[b] = 0.0f;
            memset(qb, 0, 256);
            memset(fb + 16 * b, 0, 16 * sizeof(float));
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
            fb[16 * b + k] = db * (float)_mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q8));
        }
    }
    return bad != 0;
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
            d[b] = 0.0f;
            memset(qs + 256 * b, 0, 256);
            memset(fb + 16 * b, 0, 16 * sizeof(float));
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
