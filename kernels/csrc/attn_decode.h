/* One decode token's attention block between its two projections, in C so that two modules run
 * the same code: _ops.attention_decode (its checked Python entry) and _kquants'
 * decode_layers_into (a whole step's layers with no Python between them). Both are built with
 * the same flags (setup.py), so the same bits. The row functions are ops_simd.h's. */
#ifndef WS_ATTN_DECODE_H
#define WS_ATTN_DECODE_H

#include <stdint.h>
#include "ops_simd.h"

/* RMSNorm of `rows` consecutive rows of `width` floats in place, each times w[width] */
static inline void ws_norm_rows(float *x, const float *w, int64_t rows, int64_t width, double eps) {
    for (int64_t r = 0; r < rows; r++)
        ws_rms_norm_row(x + r * width, w, width, eps, x + r * width);
}

/* RoPE of `heads` consecutive heads of hd floats in place at the angles c / s (half floats each):
   NEOX pairs (d, d + half), else adjacent pairs */
static inline void ws_rope_heads(float *x, int64_t heads, int64_t hd, const float *c, const float *s,
                                 int64_t half, int neox) {
    for (int64_t h = 0; h < heads; h++) {
        if (neox)
            ws_rope_neox_row(x + h * hd, c, s, half);
        else
            ws_rope_norm_row(x + h * hd, c, s, half);
    }
}

/* out[h] = ws_attend_head for each query head h of q (q, out: [heads, hd] contiguous; caches
 * [n_ctx, kvh, hd]; head h reads kv head h / (heads / kvh)); with a gate (not NULL), out[h] *=
 * sigmoid(gate + h * gate_stride). One thread unless the caches are long enough to pay for
 * waking the others; the heads of one kv head together (ws_attend_group: its keys read once,
 * block by block) where there are at least as many kv heads as threads, else head by head (the
 * same bits either way). */
static inline void ws_attend_heads(const float *q, const float *k_cache, const float *v_cache, int64_t heads,
                                   int64_t kvh, int64_t hd, int64_t n_kv, float scale, float *scores,
                                   int64_t scores_stride, float *out, const float *gate, int64_t gate_stride,
                                   int threads) {
    const int64_t group = heads / kvh, stride = kvh * hd;
    const int nt = n_kv * heads * hd >= 262144 ? threads : 1;
    if (kvh >= nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t g = 0; g < kvh; g++)
            ws_attend_group(q + g * group * hd, group, k_cache + g * hd, v_cache + g * hd, n_kv, stride, hd,
                            scale, scores + g * group * scores_stride, scores_stride, out + g * group * hd);
    } else {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t h = 0; h < heads; h++)
            ws_attend_head(q + h * hd, k_cache + (h / group) * hd, v_cache + (h / group) * hd, n_kv,
                           stride, hd, scale, scores + h * scores_stride, out + h * hd);
    }
    if (gate != NULL)
        for (int64_t h = 0; h < heads; h++)
            ws_sigmoid_gate_row(out + h * hd, gate + h * gate_stride, hd);
}

/* One token at position pos, from its QKV projection qkv: float[(gated ? 2 : 1) heads hd + 2 kvh hd]
 * (head h's q at h * qw, qw = (gated ? 2 : 1) hd, its gate right after it; then K, then V):
 * q[h] = head h's q, K and V written to the caches' row pos; Q and K RMS-normed (q_norm / k_norm
 * not NULL: per head, or over the whole projection with norm_full), both rotated by RoPE at the
 * angles c / s (the tables' row pos, n_rot / 2 floats each); out[h] = ws_attend_heads over
 * positions 0..pos; gated: out *= sigmoid(gate). q, out: float[heads, hd]; caches
 * float[n_ctx, kvh, hd]; scores: heads rows of >= pos + 1 floats, scores_stride apart. */
static inline void ws_attention_decode(const float *qkv, int64_t heads, int64_t kvh, int64_t hd, int gated,
                                       const float *q_norm, const float *k_norm, int norm_full, double eps,
                                       int64_t pos, const float *c, const float *s, int64_t n_rot, int neox,
                                       float *k_cache, float *v_cache, float scale, float *q, float *out,
                                       float *scores, int64_t scores_stride, int threads) {
    const int64_t qw = (gated ? 2 : 1) * hd, kv0 = heads * qw, kvw = kvh * hd, half = n_rot / 2;
    float *kt = k_cache + pos * kvw, *vt = v_cache + pos * kvw;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t j = 0; j < hd; j++)
            q[h * hd + j] = qkv[h * qw + j];
    for (int64_t j = 0; j < kvw; j++) {
        kt[j] = qkv[kv0 + j];
        vt[j] = qkv[kv0 + kvw + j];
    }
    if (q_norm != NULL)   /* over the whole projection (one row) or per head */
        ws_norm_rows(q, q_norm, norm_full ? 1 : heads, norm_full ? heads * hd : hd, eps);
    if (k_norm != NULL)
        ws_norm_rows(kt, k_norm, norm_full ? 1 : kvh, norm_full ? kvw : hd, eps);
    ws_rope_heads(q, heads, hd, c, s, half, neox);
    ws_rope_heads(kt, kvh, hd, c, s, half, neox);
    ws_attend_heads(q, k_cache, v_cache, heads, kvh, hd, pos + 1, scale, scores, scores_stride, out,
                    gated ? qkv + hd : NULL, qw, threads);
}

#endif /* WS_ATTN_DECODE_H */
