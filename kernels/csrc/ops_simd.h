/* The per-token small operations of kernels/_ops.pyx, one row at a time, in loops the compiler
 * turns into SIMD code (-O3 -march=native, OpenMP's `simd` pragmas: the module is built with
 * -fopenmp).
 *
 * Why C and not Cython loops: a float sum in a Cython loop is a chain of dependent adds (the
 * compiler may not reorder it), and expf() is a libm call per element; at decode these rows are
 * short (64..4096 floats), so a 128-long dot product paid ~4 cycles per element and one-token
 * attention over 30 cached positions of 32 heads took longer than the layer's weight matmuls.
 * `#pragma omp simd reduction` allows the reordering for exactly these sums, and ws_expf is an
 * exp the vectoriser can inline. (Check with -fopt-info-vec-optimized when changing a loop:
 * a libm call such as floorf in it is enough to keep it scalar.)
 */
#ifndef WS_OPS_SIMD_H
#define WS_OPS_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "sum16.h"

/* exp(x) in float: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial
 * (expf's coefficients), 2^n from exponent bits. Within 2 ulp of expf on [-87, 88]; below -87
 * it returns 0 (expf's results there are denormal or 0), above 88 +inf (expf's are within 2x of
 * FLT_MAX there); NaN gives NaN. The selects are written as comparisons, not fminf/fmaxf, so a
 * NaN is never clamped into a number. */
static inline float ws_expf(float x) {
    const float hi = 88.0f, lo = -87.0f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    /* n = round(xc / ln2) by adding and taking away 1.5 * 2^23 (floorf would stop GCC 12
     * vectorising the loop; without -ffast-math the pair is not folded away) */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f;  /* ln2 in two parts: the first exact in float */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n, n in [-125, 127] after the clamp */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x > hi ? INFINITY : y;
    y = x < lo ? 0.0f : y;
    return x != x ? x : y;
}

/* sum of a[i] * b[i], i < n, in float, in SIMD lanes */
static inline float ws_dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* out = x * w / sqrt(mean(x^2) + eps); the sum of squares in double, as ggml's rms_norm; out may be x */
static inline void ws_rms_norm_row(const float *x, const float *w, int64_t n, double eps, float *out) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / n + eps));
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        out[i] = (x[i] * scale) * w[i];
}

/* rotate one head's first 2 * half dimensions: NEOX pairs (d, d + half) */
static inline void ws_rope_neox_row(float *x, const float *c, const float *s, int64_t half) {
#pragma omp simd
    for (int64_t d = 0; d < half; d++) {
        float a = x[d], b = x[d + half];
        x[d] = a * c[d] - b * s[d];
        x[d + half] = a * s[d] + b * c[d];
    }
}

/* rotate one head's first 2 * half dimensions: adjacent pairs (2d, 2d + 1) (llama.cpp's NORM) */
static inline void ws_rope_norm_row(float *x, const float *c, const float *s, int64_t half) {
#pragma omp simd
    for (int64_t d = 0; d < half; d++) {
        float a = x[2 * d], b = x[2 * d + 1];
        x[2 * d] = a * c[d] - b * s[d];
        x[2 * d + 1] = a * s[d] + b * c[d];
    }
}

/* out = gate / (1 + exp(-gate)) * up over one row of m */
static inline void ws_swiglu_row(const float *gate, const float *up, int64_t m, float *out) {
#pragma omp simd
    for (int64_t j = 0; j < m; j++) {
        float g = gate[j];
        out[j] = g / (1.0f + ws_expf(-g)) * up[j];
    }
}

/* scores[t] = scale * (q . k_t) for t < n_kv, k_t = k + t * row_stride. With AVX-512 and hd a
 * multiple of 16, 16 keys at a time: 16 independent FMA chains (one dot product alone is a chain of
 * hd / 16 dependent FMAs: ~4 multiply-adds a cycle; prefill attention of 512 tokens spent ~80 ms a
 * layer there), their lanes summed by one tree (sum16.h) instead of a horizontal sum per key;
 * the last n_kv % 16 keys as zeros in the same tree, so every key's sum has the same order. */
static inline void ws_scores(const float *q, const float *k, int64_t n_kv, int64_t row_stride,
                             int64_t hd, float scale, float *scores) {
#if defined(__AVX512F__)
    if (hd % 16 == 0) {
        const __m512 vscale = _mm512_set1_ps(scale);
        for (int64_t t = 0; t < n_kv; t += 16) {
            const int m = n_kv - t < 16 ? (int)(n_kv - t) : 16;
            const float *k0 = k + t * row_stride;
            __m512 acc[16];
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_setzero_ps();
            for (int64_t d = 0; d < hd; d += 16) {
                const __m512 qv = _mm512_loadu_ps(q + d);
                for (int j = 0; j < 16; j++)
                    if (j < m)
                        acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + j * row_stride + d), acc[j]);
            }
            _mm512_mask_storeu_ps(scores + t, (__mmask16)((1u << m) - 1u), _mm512_mul_ps(ws_sum16(acc), vscale));
        }
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    /* the same on ymm: 8 keys at a time, 8 FMA chains, one ws_sum8 tree (a 512-token prompt's
       attention spent ~230 ms a layer on one Zen 3 core in per-key dot products) */
    if (hd % 8 == 0) {
        const __m256 vscale = _mm256_set1_ps(scale);
        for (int64_t t = 0; t < n_kv; t += 8) {
            const int m = n_kv - t < 8 ? (int)(n_kv - t) : 8;
            const float *k0 = k + t * row_stride;
            __m256 acc[8];
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_setzero_ps();
            if (m == 8) {
                for (int64_t d = 0; d < hd; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + d);
                    for (int j = 0; j < 8; j++)
                        acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j * row_stride + d), acc[j]);
                }
                _mm256_storeu_ps(scores + t, _mm256_mul_ps(ws_sum8(acc), vscale));
            } else {   /* the last keys: the same chains, the missing keys' lanes zeros */
                for (int64_t d = 0; d < hd; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + d);
                    for (int j = 0; j < 8; j++)
                        if (j < m)
                            acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j * row_stride + d), acc[j]);
                }
                float s8[8];
                _mm256_storeu_ps(s8, _mm256_mul_ps(ws_sum8(acc), vscale));
                for (int j = 0; j < m; j++)
                    scores[t + j] = s8[j];
            }
        }
        return;
    }
#endif
    for (int64_t t = 0; t < n_kv; t++)
        scores[t] = ws_dot(q, k + t * row_stride, hd) * scale;
}

/* out[i] = exp(x[i] - m) for i < n (out may be x); returns their sum, in double */
static inline double ws_exp_sum(const float *x, int64_t n, float m, float *out) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) {
        float p = ws_expf(x[i] - m);
        out[i] = p;
        total += p;
    }
    return total;
}

/* out[0..W nv) (+)= sum over t < n_kv of (scores[t] * inv) * v_t, W the vector's lanes, nv <= 8
 * vectors kept in registers (a constant at each call once inlined), each lane a chain of FMAs in
 * key order; with first the chains start from zero, else from out's values (a block of keys
 * continuing the chains of the blocks before it: the same bits as one call over all the keys) */
#if defined(__AVX512F__)
#define WS_WSUM_LANES 16
static inline __attribute__((always_inline)) void ws_weighted_sum_regs(
        const float *scores, float inv, const float *v, int64_t n_kv, int64_t row_stride, int nv, int first,
        float *out) {
    __m512 acc[8];
    for (int c = 0; c < 8; c++)
        acc[c] = c < nv && !first ? _mm512_loadu_ps(out + 16 * c) : _mm512_setzero_ps();
    for (int64_t t = 0; t < n_kv; t++) {
        const float *vt = v + t * row_stride;
        const __m512 p = _mm512_set1_ps(scores[t] * inv);
        for (int c = 0; c < 8; c++)
            if (c < nv)
                acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + 16 * c), acc[c]);
    }
    for (int c = 0; c < 8; c++)
        if (c < nv)
            _mm512_storeu_ps(out + 16 * c, acc[c]);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* on ymm 8 accumulators, the broadcast and a load fit the 16 registers (128 dimensions would not) */
#define WS_WSUM_LANES 8
static inline __attribute__((always_inline)) void ws_weighted_sum_regs(
        const float *scores, float inv, const float *v, int64_t n_kv, int64_t row_stride, int nv, int first,
        float *out) {
    __m256 acc[8];
    for (int c = 0; c < 8; c++)
        acc[c] = c < nv && !first ? _mm256_loadu_ps(out + 8 * c) : _mm256_setzero_ps();
    for (int64_t t = 0; t < n_kv; t++) {
        const float *vt = v + t * row_stride;
        const __m256 p = _mm256_set1_ps(scores[t] * inv);
        for (int c = 0; c < 8; c++)
            if (c < nv)
                acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; c++)
        if (c < nv)
            _mm256_storeu_ps(out + 8 * c, acc[c]);
}
#endif

/* the dimensions one pass of ws_weighted_sum takes over the keys for a head of hd: 8 vectors
 * (4 when hd is a multiple of only 4 vectors) in registers, else all hd through memory */
static inline int64_t ws_weighted_sum_pass(int64_t hd) {
#if defined(WS_WSUM_LANES)
    if (hd % (8 * WS_WSUM_LANES) == 0)
        return 8 * WS_WSUM_LANES;
    if (hd % (4 * WS_WSUM_LANES) == 0)
        return 4 * WS_WSUM_LANES;
#endif
    return hd;
}

/* out (+)= sum over t < n_kv of (scores[t] * inv) * v_t over the pass = ws_weighted_sum_pass(hd)
 * dimensions at v and out: in registers, or one FMA chain a dimension through memory; first as
 * ws_weighted_sum_regs */
static inline void ws_weighted_sum(const float *scores, float inv, const float *v, int64_t n_kv,
                                   int64_t row_stride, int64_t pass, int first, float *out) {
#if defined(WS_WSUM_LANES)
    /* each call with a constant vector count: the accumulators stay in registers */
    if (pass == 8 * WS_WSUM_LANES) {
        ws_weighted_sum_regs(scores, inv, v, n_kv, row_stride, 8, first, out);
        return;
    }
    if (pass == 4 * WS_WSUM_LANES) {
        ws_weighted_sum_regs(scores, inv, v, n_kv, row_stride, 4, first, out);
        return;
    }
#endif
    if (first)
        for (int64_t d = 0; d < pass; d++)
            out[d] = 0.0f;
    for (int64_t t = 0; t < n_kv; t++) {
        const float *vt = v + t * row_stride;
        float p = scores[t] * inv;
#pragma omp simd
        for (int64_t d = 0; d < pass; d++)
            out[d] += p * vt[d];
    }
}

/* keys a block of ws_attend_group when each key brings `width` floats (K's head, or V's columns of
 * a pass): ~16 KB, whole groups of 16 keys (ws_scores' SIMD groups) */
static inline int64_t ws_attend_block(int64_t width) {
    const int64_t keys = 4096 / width / 16 * 16;
    return keys < 16 ? 16 : keys;
}

/* softmax(scale * K q_g) . V for the ng query heads q_g = q + g * hd (g < ng) that share one kv
 * head (grouped-query attention): k, v point at the kv head's first cached vector, the next
 * position row_stride floats further; scores: ng rows of n_kv floats of scratch, scores_stride
 * apart; out: ng heads of hd floats. The heads take each block of keys in turn while it is in L1
 * (one kv head's K and V at 512 positions fill a Zen 3 core's whole 512 KB L2; head by head, a
 * prompt's attention read them from L3 for every head). A head's bits do not depend on ng or on
 * the blocks: its key blocks are whole SIMD groups of ws_scores, and its weighted sum continues
 * the same FMA chains from block to block. */
static inline void ws_attend_group(const float *q, int64_t ng, const float *k, const float *v, int64_t n_kv,
                                   int64_t row_stride, int64_t hd, float scale, float *scores,
                                   int64_t scores_stride, float *out) {
    if (ng > 64) {   /* inv's room: 64 heads at a time (each head's bits are the same either way) */
        for (int64_t g0 = 0; g0 < ng; g0 += 64)
            ws_attend_group(q + g0 * hd, ng - g0 < 64 ? ng - g0 : 64, k, v, n_kv, row_stride, hd, scale,
                            scores + g0 * scores_stride, scores_stride, out + g0 * hd);
        return;
    }
    const int64_t block = ws_attend_block(hd);
    float inv[64];
    for (int64_t t0 = 0; t0 < n_kv; t0 += block) {
        const int64_t tn = n_kv - t0 < block ? n_kv - t0 : block;
        for (int64_t g = 0; g < ng; g++)
            ws_scores(q + g * hd, k + t0 * row_stride, tn, row_stride, hd, scale, scores + g * scores_stride + t0);
    }
    for (int64_t g = 0; g < ng; g++) {
        float *sg = scores + g * scores_stride;
        float m = -3.4e38f;
        for (int64_t t = 0; t < n_kv; t++)
            m = sg[t] > m ? sg[t] : m;
        inv[g] = (float)(1.0 / ws_exp_sum(sg, n_kv, m, sg));
    }
    const int64_t pass = ws_weighted_sum_pass(hd), vblock = ws_attend_block(pass);
    for (int64_t c = 0; c < hd; c += pass)
        for (int64_t t0 = 0; t0 < n_kv; t0 += vblock) {
            const int64_t tn = n_kv - t0 < vblock ? n_kv - t0 : vblock;
            for (int64_t g = 0; g < ng; g++)
                ws_weighted_sum(scores + g * scores_stride + t0, inv[g], v + t0 * row_stride + c, tn, row_stride,
                                pass, t0 == 0, out + g * hd + c);
        }
}

/* softmax(scale * K q) . V for one head (ws_attend_group's bits: the decode calls' attention) */
static inline void ws_attend_head(const float *q, const float *k, const float *v, int64_t n_kv,
                                  int64_t row_stride, int64_t hd, float scale, float *scores, float *out) {
    ws_attend_group(q, 1, k, v, n_kv, row_stride, hd, scale, scores, 0, out);
}

/* whether x[n] holds a NaN or an Inf: their bits without the sign are >= 0x7F800000 (all-ones
 * exponent); the max of those bits vectorises (an integer max; a float test would not, without
 * -ffast-math). The forward pass's non-finite check on every layer's residual and the logits. */
static inline int ws_row_nonfinite(const float *x, int64_t n) {
    uint32_t top = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b;
        memcpy(&b, x + j, 4);
        b &= 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    return top >= 0x7F800000u;
}

/* out *= sigmoid(gate) over n floats (gated attention's per-head output gate) */
static inline void ws_sigmoid_gate_row(float *out, const float *gate, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        out[i] = out[i] * (1.0f / (1.0f + ws_expf(-gate[i])));
}

/* softmax over one row of n: exp(x - max) / sum, the sum in double (as ws_attend_head). A NaN in
 * the row makes the whole row NaN (the sum is NaN); an all -inf row too (-inf - -inf). */
static inline void ws_softmax_row(const float *x, int64_t n, float *out) {
    float m = -INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        m = x[i] > m ? x[i] : m;
        nan |= x[i] != x[i];
    }
    const double total = ws_exp_sum(x, n, m, out);
    float s = nan ? NAN : (float)total;
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        out[i] = out[i] / s;
}

/* (a, ia) ranks before (b, ib): larger value first, equal values by lower index (a stable
 * descending sort's order); NaN ranks after every number (as NumPy's sort puts it last) */
static inline int ws_ranks_before(float a, int64_t ia, float b, int64_t ib) {
    int an = a != a, bn = b != b;
    if (an || bn)
        return an && bn ? ia < ib : bn;
    return a > b || (a == b && ia < ib);
}

/* ids[0..k) = the indices of the k first values of p[0..n) in ws_ranks_before's order (a stable
 * argsort of -p, cut at k). One pass keeps the best k so far in order: a value that does not rank
 * before the k-th is passed over after one comparison, so a row costs ~n comparisons, not the k * n
 * of a pass per pick (a 512-token prompt's routing, 256 experts top-8: 3.8 ms a layer). The order
 * is strict and total, so the k picks and their order are the same either way. k <= n. */
static inline void ws_topk_row(const float *p, int64_t n, int64_t k, int64_t *ids) {
    int64_t have = 0;
    for (int64_t i = 0; i < n; i++) {
        if (have == k && !ws_ranks_before(p[i], i, p[ids[k - 1]], ids[k - 1]))
            continue;
        int64_t j = have < k ? have++ : k - 1;   /* the slot it takes, then moved up past worse ones */
        while (j > 0 && ws_ranks_before(p[i], i, p[ids[j - 1]], ids[j - 1])) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = i;
    }
}

/* A router's choice for one row of probabilities p[0..n): with choose, ids[0..k) = ws_topk_row's
   picks (else the caller's ids are kept); w[j] = p[ids[j]], divided by their sum (in j order)
   with norm (_ops.topk_weights_into, and the fused MoE decode call's router) */
static inline void ws_topk_weights_row(const float *p, int64_t n, int64_t k, int choose, int norm,
                                       int64_t *ids, float *w) {
    if (choose)
        ws_topk_row(p, n, k, ids);
    float total = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        w[j] = p[ids[j]];
        total = total + w[j];
    }
    if (norm)
        for (int64_t j = 0; j < k; j++)
            w[j] = w[j] / total;
}

/* y = y * w, then out = out + y, over n floats: two roundings, as NumPy's `np.multiply(y, w,
 * out=y); out += y` does, never one fused multiply-add (GCC contracts a * b + c into an FMA at
 * -O3 unless told not to), so the fused MoE call gives the per-expert path's bits */
__attribute__((optimize("fp-contract=off")))
static void ws_scale_add_row(float *out, float *y, float w, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = y[i] * w;
        out[i] = out[i] + y[i];
    }
}

#endif /* WS_OPS_SIMD_H */
