/* AMX-INT8 tiles for the legacy 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in the
 * matrix-matrix product (prefill), used by kernels/_legacy.pyx when n >= its AMX cut-off.
 * Built on legacy.h's helpers (lg_unpack_pair, lg_offset, ...).
 *
 * Per 32-element block b, 16 weight rows m and 16 activation rows n:
 *
 *     C[m][n] = sum_k w_k[m] * xq_k[n]                    one tile product, K = 32
 *     acc[m][n] += (dw[m] * dx[n]) * C[m][n]              (AVX-512 floats)
 *     acc[m][n] += sum_b mw_b[m] * s_b[n]                 (Q4_1 / Q5_1 only, after the blocks)
 *
 * Offset types (Q4_0: q - 8, Q5_0: q - 16, Q8_0: q) keep *signed* weights and use tdpbssd
 * (s8 x s8), so the offset lives inside the exact int32 dot instead of the AVX-512 path's float
 * term dw * (-off * dx * sum(xq)): the same quantity without its rounding. Min types keep the
 * unsigned codes (tdpbusd, u8 x s8) and add m * s (Q8_1's fp16 s) as the AVX-512 path does.
 * Either way the result is matmul_q8_ref's up to float summation order.
 *
 * The scales differ per block, so every block's C is stored and scaled in floats; that float
 * work (3-4 vector ops per 16 outputs per block) is the cost, the tile products are cheap.
 * The product of block b goes to one C tile / buffer while block b - 1's is scaled (two
 * operand pairs: tile registers are not renamed, see kquants_amx.h).
 *
 * Buffers (64-byte aligned, LG_AMX_BLK bytes per block):
 *   weights, per 16-row group and block: A  int8/u8[16 m][32 k]   (the activations' k order)
 *                                        dw float[16], mw float[16]   (mw: min types only)
 *   activations, per 16-row group and block: B  s8[8 k/4][16 n][4]   (VNNI)
 *                                            dx float[16], s float[16]    (s: min types only)
 * Rows past the end (weights: rows % 16, activations: n % 16) are zeros and never written out.
 */
#ifndef LG_LEGACY_AMX_H
#define LG_LEGACY_AMX_H

#include "legacy.h"

#if LG_SIMD && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define LG_AMX 1
#include <unistd.h>
#include <sys/syscall.h>
#else
#define LG_AMX 0
#endif

/* bytes per block of either buffer: 512 tile bytes + 16 + 16 floats */
#define LG_AMX_BLK 640

static int lg_amx_built(void) { return LG_AMX; }

#if LG_AMX

/* Linux hands out AMX tile state only on request (once per process, all threads); the same
   call as kquants_amx.h's, repeated here so the two modules do not depend on each other. */
static int lg_amx_request(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lg_tilecfg;

/* tmm0 / tmm1: C (16 x 16 int32); tmm2 / tmm4: A (16 x 32 bytes); tmm3 / tmm5: B (8 x 64).
   Per thread: loaded by each group call, released at its end. */
static void lg_amx_config(void) {
    lg_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = c.rows[1] = 16; c.colsb[0] = c.colsb[1] = 64;
    c.rows[2] = c.rows[4] = 16; c.colsb[2] = c.colsb[4] = 32;
    c.rows[3] = c.rows[5] = 8;  c.colsb[3] = c.colsb[5] = 64;
    _tile_loadconfig(&c);
}

/* Activation rows r0..r0+15 (those < n) of the quantized activations (xq int8[n][xs], dx / cs
   float[n][fs], blocks in the weights' k order) -> nb blocks of B / dx / s at dst. */
static void lg_amx_pack_act(const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs,
                            int n, int nb, int r0, uint8_t *dst) {
    memset(dst, 0, (size_t)nb * LG_AMX_BLK);
    for (int r = 0; r < 16 && r0 + r < n; r++) {
        const int8_t *q = xq + (size_t)(r0 + r) * xs;
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = dst + (size_t)b * LG_AMX_BLK;
            for (int kk = 0; kk < 8; kk++)          /* k = 4kk..4kk+3 of row r: one dword */
                memcpy(blk + 64 * kk + 4 * r, q + 32 * (size_t)b + 4 * kk, 4);
            ((float *)(blk + 512))[r] = dx[(size_t)(r0 + r) * fs + b];
            ((float *)(blk + 576))[r] = cs[(size_t)(r0 + r) * fs + b];
        }
    }
}

/* Weight rows w[0..nrw-1] (row stride row_bytes, nrw <= 16) -> nb blocks of A / dw / mw. */
static void lg_amx_unpack(const int t, const uint8_t *w, size_t row_bytes, int nb, int nrw,
                          uint8_t *scr) {
    const int bs = ws_block_bytes(t), has_min = lg_has_min(t);
    const __m512i off = _mm512_set1_epi8((char)lg_offset(t));
    for (int m = 0; m < 16; m++) {
        const uint8_t *row = w + (size_t)m * row_bytes;
        for (int b = 0; b < nb; b += 2) {
            __m512i v = _mm512_setzero_si512();
            if (m < nrw) {
                for (int o = 0; o < 2 * bs; o += 64)
                    _mm_prefetch((const char *)row + (size_t)b * bs + LG_PREFETCH + o, _MM_HINT_T0);
                v = lg_unpack_pair(t, row + (size_t)b * bs, b + 1 < nb);
                if (!has_min) v = _mm512_sub_epi8(v, off);   /* u = q + off -> signed q */
            }
            uint8_t *s = scr + (size_t)b * LG_AMX_BLK + 32 * m;
            _mm256_store_si256((__m256i *)s, _mm512_castsi512_si256(v));
            if (b + 1 < nb) _mm256_store_si256((__m256i *)(s + LG_AMX_BLK), _mm512_extracti64x4_epi64(v, 1));
        }
        for (int b = 0; b < nb; b++) {
            float *f = (float *)(scr + (size_t)b * LG_AMX_BLK + 512);
            const uint8_t *p = row + (size_t)b * bs;
            f[m] = m < nrw ? ws_inf_to_nan(_cvtsh_ss(ws_load_u16(p))) : 0.0f;   /* Inf: NaN, as the reference */
            f[16 + m] = m < nrw && has_min ? ws_inf_to_nan(_cvtsh_ss(ws_load_u16(p + 2))) : 0.0f;
        }
    }
}

/* One block's tile product into c (int32[16][16]) on tiles (TC, TA, TB): (0, 2, 3) or (1, 4, 5).
   Tile numbers are pasted into the assembly as literals, hence the macro. */
#define LG_AMX_TDP(TC, TA, TB, HAS_MIN, WB, XB, C) do {                                     \
        _tile_zero(TC);                                                                       \
        _tile_loadd(TA, (WB), 32);                                                            \
        _tile_loadd(TB, (XB), 64);                                                            \
        if (HAS_MIN) _tile_dpbusd(TC, TA, TB);                                                \
        else _tile_dpbssd(TC, TA, TB);                                                        \
        _tile_stored(TC, (C), 64);                                                            \
    } while (0)

/* acc[m][:] += (dw[m] * dx[:]) * C[m][:] */
WS_INLINE void lg_amx_scale(const int32_t *c, const uint8_t *wb, const uint8_t *xb,
                            __m512 acc[16]) {
    const float *dw = (const float *)(wb + 512);
    const __m512 dx = _mm512_load_ps((const float *)(xb + 512));
    for (int m = 0; m < 16; m++) {
        const __m512 cf = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 16 * m)));
        acc[m] = _mm512_fmadd_ps(cf, _mm512_mul_ps(dx, _mm512_set1_ps(dw[m])), acc[m]);
    }
}

/* acc[m][:] += sum_b mw_b[m] * s_b[:] (Q4_1 / Q5_1's min term): a loop of its own, measured
   faster than one more FMA per row inside lg_amx_scale (Q4_1 / Q8_0 time 1.23 -> 1.09,
   3072x576, n = 256, one thread). */
WS_INLINE void lg_amx_min_term(const uint8_t *wsc, const uint8_t *xact, int nb, __m512 acc[16]) {
    for (int b = 0; b < nb; b++) {
        const float *mw = (const float *)(wsc + (size_t)b * LG_AMX_BLK + 576);
        const __m512 s = _mm512_load_ps((const float *)(xact + (size_t)b * LG_AMX_BLK + 576));
        for (int m = 0; m < 16; m++) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(mw[m]), s, acc[m]);
    }
}

/* One 16 x 16 output tile over all nb blocks: out[r][m] for r < nrx, m < nrw. */
WS_INLINE void lg_amx_tile_out(const int has_min, const uint8_t *wsc, const uint8_t *xact, int nb,
                               int nrw, int nrx, float *out, size_t ostride) {
    int32_t c[2][256] __attribute__((aligned(64)));   /* C of blocks b (even / odd) */
    __m512 acc[16];
    for (int m = 0; m < 16; m++) acc[m] = _mm512_setzero_ps();
    LG_AMX_TDP(0, 2, 3, has_min, wsc, xact, c[0]);
    for (int b = 1; b < nb; b++) {
        const size_t o = (size_t)b * LG_AMX_BLK;
        if (b & 1) LG_AMX_TDP(1, 4, 5, has_min, wsc + o, xact + o, c[1]);
        else LG_AMX_TDP(0, 2, 3, has_min, wsc + o, xact + o, c[0]);
        lg_amx_scale(c[(b - 1) & 1], wsc + o - LG_AMX_BLK, xact + o - LG_AMX_BLK, acc);
    }
    const size_t ol = (size_t)(nb - 1) * LG_AMX_BLK;
    lg_amx_scale(c[(nb - 1) & 1], wsc + ol, xact + ol, acc);
    if (has_min) lg_amx_min_term(wsc, xact, nb, acc);
    float tr[16][16] __attribute__((aligned(64)));    /* [m][r] -> out[r][m] */
    for (int m = 0; m < 16; m++) _mm512_store_ps(tr[m], acc[m]);
    for (int r = 0; r < nrx; r++)
        for (int m = 0; m < nrw; m++) out[(size_t)r * ostride + m] = tr[m][r];
}

/* Weight rows i0..i0+nrw-1 against activation groups g0..g1-1 (packed by lg_amx_pack_act, nb
   blocks each), n activation rows in all; out[n][ostride]. scr: nb * LG_AMX_BLK bytes, this
   thread's, 64-byte aligned. */
static void lg_amx_group(int t, const uint8_t *w, size_t row_bytes, int nb, int i0, int nrw,
                         const uint8_t *xact, int g0, int g1, int n, float *out, size_t ostride,
                         uint8_t *scr) {
    lg_amx_unpack(t, w + (size_t)i0 * row_bytes, row_bytes, nb, nrw, scr);
    lg_amx_config();
    for (int g = g0; g < g1; g++) {
        const int nrx = n - 16 * g < 16 ? n - 16 * g : 16;
        const uint8_t *xa = xact + (size_t)g * nb * LG_AMX_BLK;
        float *o = out + (size_t)16 * g * ostride + i0;
        if (lg_has_min(t)) lg_amx_tile_out(1, scr, xa, nb, nrw, nrx, o, ostride);
        else lg_amx_tile_out(0, scr, xa, nb, nrw, nrx, o, ostride);
    }
    _tile_release();
}

#else  /* no AMX in this build: never called (AMX = False in the module) */

static int lg_amx_request(void) { return 0; }
static void lg_amx_pack_act(const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs,
                            int n, int nb, int r0, uint8_t *dst) {
    (void)xq; (void)dx; (void)cs; (void)xs; (void)fs; (void)n; (void)nb; (void)r0; (void)dst;
}
static void lg_amx_group(int t, const uint8_t *w, size_t row_bytes, int nb, int i0, int nrw,
                         const uint8_t *xact, int g0, int g1, int n, float *out, size_t ostride,
                         uint8_t *scr) {
    (void)t; (void)w; (void)row_bytes; (void)nb; (void)i0; (void)nrw; (void)xact; (void)g0;
    (void)g1; (void)n; (void)out; (void)ostride; (void)scr;
}

#endif
#endif /* LG_LEGACY_AMX_H */
