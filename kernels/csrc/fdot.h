/* Float weights (F32, F16, BF16) times float activations: one weight row against R <= 4
 * activation rows, for kernels/_legacy.pyx's float matmul (legacy.h) and the router of
 * kernels/_kquants.pyx's fused MoE decode call, which must give the same bits.
 */
#ifndef WS_FDOT_H
#define WS_FDOT_H

#include "common.h"
#include "sum16.h"
#include <stddef.h>
#include <string.h>
/* AVX-512 (16 lanes) where built for it, else AVX2 + FMA + F16C (8 lanes), else scalar C */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define WS_FDOT_SIMD 1
#define WS_FDOT_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define WS_FDOT_SIMD 0
#define WS_FDOT_AVX2 1
#include <immintrin.h>
#else
#define WS_FDOT_SIMD 0
#define WS_FDOT_AVX2 0
#endif

/* bytes ahead of the weights being read that each thread prefetches (as LG_PREFETCH) */
#ifndef WS_FDOT_PREFETCH
#define WS_FDOT_PREFETCH 4096
#endif

/* ---------------------------------------------------------------------------------
   Float weights: out[r * os] = sum_k x[r][k] * w[k] for R activation rows.
   ---------------------------------------------------------------------------------- */
#if WS_FDOT_SIMD
WS_INLINE __m512 ws_fload(const int t, const uint8_t *w, int k) {
    if (t == WS_F32) return _mm512_loadu_ps((const float *)w + k);
    __m256i h = _mm256_loadu_si256((const __m256i *)(w + 2 * (size_t)k));
    if (t == WS_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
WS_INLINE __m512 ws_fload_mask(const int t, const uint8_t *w, int k, __mmask16 m) {
    if (t == WS_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const void *)(w + 2 * (size_t)k));
    if (t == WS_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
WS_INLINE void ws_fdot_tile(const int t, const int R, const uint8_t *w, int cols,
                            const float *x, size_t xs, float *out, size_t os) {
    __m512 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int k = 0;
    const int esz = t == WS_F32 ? 4 : 2;
    for (; k + 32 <= cols; k += 32) {
        for (int o = 0; o < 32 * esz; o += 64)
            _mm_prefetch((const char *)w + (size_t)k * esz + WS_FDOT_PREFETCH + o, _MM_HINT_T0);
        __m512 w0 = ws_fload(t, w, k), w1 = ws_fload(t, w, k + 16);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * xs + k), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * xs + k + 16), acc[r][1]);
        }
    }
    for (; k < cols; k += 16) {
        int left = cols - k;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        __m512 w0 = ws_fload_mask(t, w, k, m);
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + r * xs + k), acc[r][0]);
    }
    for (int r = 0; r < R; r++) out[r * os] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#else
/* weight k of a float row */
WS_INLINE float ws_fscalar(const int t, const uint8_t *w, int k) {
    float wk;
    if (t == WS_F32) memcpy(&wk, w + 4 * (size_t)k, 4);
    else if (t == WS_F16) wk = ws_fp16_to_fp32(ws_load_u16(w + 2 * (size_t)k));
    else wk = ws_bf16_to_fp32(ws_load_u16(w + 2 * (size_t)k));
    return wk;
}
#if WS_FDOT_AVX2
WS_INLINE __m256 ws_fload8(const int t, const uint8_t *w, int k) {
    if (t == WS_F32) return _mm256_loadu_ps((const float *)w + k);
    __m128i h = _mm_loadu_si128((const __m128i *)(w + 2 * (size_t)k));
    if (t == WS_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/* 32 weights a step, alternating two accumulators per row (one FMA chain would wait on its
   latency); the last cols % 8 in scalar (AVX2 has no 16-bit masked load for F16 / BF16) */
WS_INLINE void ws_fdot_tile(const int t, const int R, const uint8_t *w, int cols,
                            const float *x, size_t xs, float *out, size_t os) {
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int k = 0;
    const int esz = t == WS_F32 ? 4 : 2;
    for (; k + 32 <= cols; k += 32) {
        for (int o = 0; o < 32 * esz; o += 64)
            _mm_prefetch((const char *)w + (size_t)k * esz + WS_FDOT_PREFETCH + o, _MM_HINT_T0);
        for (int j = 0; j < 4; j++) {
            const __m256 wj = ws_fload8(t, w, k + 8 * j);
            for (int r = 0; r < R; r++)
                acc[r][j & 1] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x + r * xs + k + 8 * j), acc[r][j & 1]);
        }
    }
    for (; k + 8 <= cols; k += 8) {
        const __m256 w0 = ws_fload8(t, w, k);
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * xs + k), acc[r][0]);
    }
    for (int r = 0; r < R; r++) {
        float tail = 0.0f;
        for (int i = k; i < cols; i++) tail += ws_fscalar(t, w, i) * x[r * xs + i];
        out[r * os] = ws_hsum8(_mm256_add_ps(acc[r][0], acc[r][1])) + tail;
    }
}
#else
WS_INLINE void ws_fdot_tile(const int t, const int R, const uint8_t *w, int cols,
                            const float *x, size_t xs, float *out, size_t os) {
    for (int r = 0; r < R; r++) {
        float acc = 0.0f;
        for (int k = 0; k < cols; k++) acc += ws_fscalar(t, w, k) * x[r * xs + k];
        out[r * os] = acc;
    }
}
#endif
#endif

#define WS_FDOT_R(T) switch (R) { case 1: ws_fdot_tile(T, 1, w, cols, x, xs, out, os); break; case 2: ws_fdot_tile(T, 2, w, cols, x, xs, out, os); break; case 3: ws_fdot_tile(T, 3, w, cols, x, xs, out, os); break; default: ws_fdot_tile(T, 4, w, cols, x, xs, out, os); break; }
static void ws_fdot(int t, int R, const uint8_t *w, int cols, const float *x, size_t xs, float *out, size_t os) {
    if (t == WS_F32) { WS_FDOT_R(WS_F32) } else if (t == WS_F16) { WS_FDOT_R(WS_F16) } else { WS_FDOT_R(WS_BF16) }
}

#endif /* WS_FDOT_H */
