/* The sums of 16 zmm vectors' lanes as one zmm, by one shuffle tree (AVX-512 only).
 *
 * Lane i of ws_sum16(a) is the sum of a[i]'s 16 lanes, for all 16 at once: 46 shuffles and adds
 * (levels: 256-bit halves, 128-bit quarters, pairs, single lanes) where 16 horizontal sums would
 * take ~150 and a dependency chain each. The tree leaves lane i holding the sum of its input slot
 * ws_sum16_slot[i]; the inputs are placed in that order (the order is its own inverse), so lane i
 * is a[i]. One fixed order of additions: the same inputs give the same bits wherever it is used
 * (the k-quant kernels' rows, attention scores).
 *
 * Also one ymm's 8 lanes to a float (AVX and later): the sum and the max, which the AVX2 kernels
 * of kquants_simd.h, q8k_simd.h, legacy.h and fdot.h share. */
#ifndef WS_SUM16_H
#define WS_SUM16_H

#if defined(__AVX__)
#include <immintrin.h>
#include <stdint.h>

/* the sum of v's 8 lanes: halves, pairs, then the last two (one fixed order) */
static inline __attribute__((always_inline)) float ws_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* lane j = ws_hsum8(a[j]) for 8 ymm at once: 21 shuffles and adds where 8 ws_hsum8 take ~50.
   Each lane's sum has ws_hsum8's order, ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), so the
   same bits: halves of inputs j and j + 4 in one register, then pairs, then the last two; inputs
   enter in the slots {0, 2, 1, 3, 4, 6, 5, 7} (the order is its own inverse), which leaves lane j
   holding input j. Lanes are independent: a zero input only zeroes its own lane. */
static inline __attribute__((always_inline)) __m256 ws_sum8(const __m256 a[8]) {
    static const int slot[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    __m256 x[8], y[4], z[2];
    for (int j = 0; j < 8; j++)
        x[j] = a[slot[j]];
    for (int j = 0; j < 4; j++)   /* lanes 0-3: input x_j's a_i + a_(i+4); lanes 4-7: input x_(j+4)'s */
        y[j] = _mm256_add_ps(_mm256_permute2f128_ps(x[j], x[j + 4], 0x20), _mm256_permute2f128_ps(x[j], x[j + 4], 0x31));
    for (int j = 0; j < 2; j++)   /* per input (s0 + s2), (s1 + s3) */
        z[j] = _mm256_add_ps(_mm256_shuffle_ps(y[j], y[j + 2], 0x44), _mm256_shuffle_ps(y[j], y[j + 2], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], 0x88), _mm256_shuffle_ps(z[0], z[1], 0xDD));
}

/* out[j] = ws_hsum8 of the 8 floats at v + j * vstride, j < m <= 8 (ws_sum8 over rows in memory:
   the k-quant and legacy decode rows' partial sums). Missing rows are zeros. */
static inline __attribute__((always_inline)) void ws_sum8_rows(const float *v, int64_t vstride, int m, float *out) {
    __m256 x[8];
    for (int j = 0; j < 8; j++)
        x[j] = j < m ? _mm256_loadu_ps(v + j * vstride) : _mm256_setzero_ps();
    const __m256 u = ws_sum8(x);
    if (m == 8) {
        _mm256_storeu_ps(out, u);
    } else {
        float t[8];
        _mm256_storeu_ps(t, u);
        for (int j = 0; j < m; j++)
            out[j] = t[j];
    }
}

/* the largest of v's 8 lanes (a NaN lane: as _mm_max_ps decides, its second operand) */
static inline __attribute__((always_inline)) float ws_hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

static const int ws_sum16_slot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __attribute__((always_inline)) __m512 ws_sum16(const __m512 a[16]) {
    __m512 x[16], y[8], z[4], u[2];
    for (int j = 0; j < 16; j++)
        x[j] = a[ws_sum16_slot[j]];
    for (int j = 0; j < 8; j++)
        y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[j], x[j + 8], 0x44), _mm512_shuffle_f32x4(x[j], x[j + 8], 0xEE));
    for (int j = 0; j < 4; j++)
        z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(y[j], y[j + 4], 0x88), _mm512_shuffle_f32x4(y[j], y[j + 4], 0xDD));
    for (int j = 0; j < 2; j++)
        u[j] = _mm512_add_ps(_mm512_unpacklo_ps(z[j], z[j + 2]), _mm512_unpackhi_ps(z[j], z[j + 2]));
    return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44), _mm512_shuffle_ps(u[0], u[1], 0xEE));
}

/* out[j] = the sum of the 16 floats at v + j * vstride, j < m <= 16 (missing rows are zeros):
   the tree over rows of 16-lane partial sums (k-quant and legacy decode rows) */
static inline void ws_sum16_rows(const float *v, int64_t vstride, int m, float *out) {
    __m512 x[16];
    for (int j = 0; j < 16; j++)
        x[j] = j < m ? _mm512_loadu_ps(v + j * vstride) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << m) - 1u), ws_sum16(x));
}

#endif
#endif /* WS_SUM16_H */
