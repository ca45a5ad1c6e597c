/* The Gated DeltaNet recurrence's per-token sweep over one 64-column block of a value head's state
 * (kernels/_deltanet.pyx, _write_read), written for AVX-512: the block's delta and the two running
 * sums kv = S^T kn2 and sq = S^T qn2 stay in 12 zmm registers across the dk rows, so each row costs
 * 1 load + 1 store of S and 12 vector operations (4 products, 4 + 8 fused multiply-adds). GCC
 * kept the Cython loop's kv[64] / sq[64] arrays on the stack: every row loaded, added to and
 * stored each of them, a chain through memory (Qwen3.5-35B-A3B-shaped prefill, one layer, 512
 * tokens, 1 thread: 43 -> 36 ms with these registers; the block's copy in _delta_cols, which
 * keeps it in L1, took it to 19 ms).
 *
 * The arithmetic is the Cython loop's, element by element: r = fma(decay, S, kn[i] * delta),
 * kv = fma(kn2[i], r, kv), sq = fma(qn2[i], r, sq), rows in order; so each column's sums add in the
 * same order as there. AVX2 + FMA machines sweep 32 columns at a time (below); without either the
 * Cython loop runs (WS_DN_SWEEP 0).
 */
#ifndef WS_DELTANET_SIMD_H
#define WS_DELTANET_SIMD_H

#include <stddef.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define WS_DN_SWEEP 1

/* S (dk rows of 64 floats, ld floats apart) = decay S + kn (x) delta; then kv = S^T kn2 and
   sq = S^T qn2 over the new S (64 floats each) */
static inline void ws_dn_write_read64(float *S, ptrdiff_t ld, ptrdiff_t dk, float decay, const float *kn,
                                      const float *delta, const float *kn2, const float *qn2,
                                      float *kv, float *sq) {
    const __m512 dec = _mm512_set1_ps(decay);
    __m512 d[4], k[4], q[4];
    for (int c = 0; c < 4; c++) {
        d[c] = _mm512_loadu_ps(delta + 16 * c);
        k[c] = _mm512_setzero_ps();
        q[c] = _mm512_setzero_ps();
    }
    for (ptrdiff_t i = 0; i < dk; i++) {
        float *row = S + i * ld;
        const __m512 ki = _mm512_set1_ps(kn[i]), k2 = _mm512_set1_ps(kn2[i]), q2 = _mm512_set1_ps(qn2[i]);
        for (int c = 0; c < 4; c++) {
            const __m512 r = _mm512_fmadd_ps(dec, _mm512_loadu_ps(row + 16 * c), _mm512_mul_ps(ki, d[c]));
            _mm512_storeu_ps(row + 16 * c, r);
            k[c] = _mm512_fmadd_ps(k2, r, k[c]);
            q[c] = _mm512_fmadd_ps(q2, r, q[c]);
        }
    }
    for (int c = 0; c < 4; c++) {
        _mm512_storeu_ps(kv + 16 * c, k[c]);
        _mm512_storeu_ps(sq + 16 * c, q[c]);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WS_DN_SWEEP 1

/* AVX2: 16 ymm registers hold one 32-column half's delta and sums (12) plus the row's three
   broadcasts, so the block is swept twice, each half with AVX-512's arithmetic per element (the
   same operations in the same row order: the same bits as one sweep) */
static inline void ws_dn_write_read64(float *S, ptrdiff_t ld, ptrdiff_t dk, float decay, const float *kn,
                                      const float *delta, const float *kn2, const float *qn2,
                                      float *kv, float *sq) {
    const __m256 dec = _mm256_set1_ps(decay);
    for (int h = 0; h < 64; h += 32) {
        __m256 d[4], k[4], q[4];
        for (int c = 0; c < 4; c++) {
            d[c] = _mm256_loadu_ps(delta + h + 8 * c);
            k[c] = _mm256_setzero_ps();
            q[c] = _mm256_setzero_ps();
        }
        for (ptrdiff_t i = 0; i < dk; i++) {
            float *row = S + i * ld + h;
            const __m256 ki = _mm256_set1_ps(kn[i]), k2 = _mm256_set1_ps(kn2[i]), q2 = _mm256_set1_ps(qn2[i]);
            for (int c = 0; c < 4; c++) {
                const __m256 r = _mm256_fmadd_ps(dec, _mm256_loadu_ps(row + 8 * c), _mm256_mul_ps(ki, d[c]));
                _mm256_storeu_ps(row + 8 * c, r);
                k[c] = _mm256_fmadd_ps(k2, r, k[c]);
                q[c] = _mm256_fmadd_ps(q2, r, q[c]);
            }
        }
        for (int c = 0; c < 4; c++) {
            _mm256_storeu_ps(kv + h + 8 * c, k[c]);
            _mm256_storeu_ps(sq + h + 8 * c, q[c]);
        }
    }
}

#else
#define WS_DN_SWEEP 0

static inline void ws_dn_write_read64(float *S, ptrdiff_t ld, ptrdiff_t dk, float decay, const float *kn,
                                      const float *delta, const float *kn2, const float *qn2,
                                      float *kv, float *sq) {
    (void)S; (void)ld; (void)dk; (void)decay; (void)kn; (void)delta; (void)kn2; (void)qn2; (void)kv; (void)sq;
}
#endif

#endif
