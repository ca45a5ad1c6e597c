/* AMX-INT8 tiles for the Q2_K matrix-matrix product (prefill, batched experts), used by
 * kernels/_kquants.pyx when n >= a cut-off (decode stays on kquants_simd.h's AVX-512 path).
 *
 * Per weight block (256 elements) of 16 weight rows m and 16 activation rows n:
 *
 *     C1[m][n] = sum_i (q_i * sc_i)[m] * xq_i[n]       4 x tdpbusd (u8 x s8, K = 64 each)
 *     C2[m][n] = sum_k min_k[m] * bsum_k[n]             1 x tdpbusd (K = 32, see below)
 *     acc[m][n] += dx[n] * (d[m] * C1[m][n] - dmin[m] * C2[m][n])       (AVX-512 floats)
 *
 * which is the same math as ws_kq_rows_avx (dx * d * sum(q' xq) - sum_k g_k fb_k), in integers
 * up to the per-block float scaling, so the result equals matmul_q8_ref up to summation order.
 *
 * The min term as an exact int8 product: bsum_k (sum of 16 int8 quants, |bsum| <= 2032) is split
 * as bsum = lo + 16 hi, lo = bsum & 15 in 0..15, hi = bsum >> 4 in -127..127 (both s8), and the
 * weight side holds (min_k, 16 min_k) (<= 240, u8). One K = 32 tile product instead of expanding
 * the mins over 256 elements (4 more tdpbusd).
 *
 * Buffers (all 64-byte aligned):
 *   weight scratch per block: A  u8[16 rows][256]  (scaled codes, WS_KQ_PERMUTED order, stride 256)
 *                             A2 u8[16 rows][32]   (min_k, then 16 min_k)
 *                             d, dmin float[16]
 *   activations per (group of 16 rows, block): B  s8[64 K/4][16 n][4]  (VNNI: 4 tiles of 1 KB)
 *                                              B2 s8[8 K/4][16 n][4]   (lo_k at K = k, hi_k at 16 + k)
 *                                              dx float[16]
 * Rows past the end (weights: rows % 16, activations: n % 16) are zeros, never written out.
 */
#ifndef WS_KQUANTS_AMX_H
#define WS_KQUANTS_AMX_H

#include "kquants_simd.h"

#if WS_KQ_AVX512 && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define WS_KQ_AMX 1
#include <unistd.h>
#include <sys/syscall.h>
#else
#define WS_KQ_AMX 0
#endif

/* bytes of one block in the weight scratch and in the packed activations */
#define WS_AMX_WBLK (4096 + 512 + 64 + 64)
#define WS_AMX_XBLK (4096 + 512 + 64)

/* Position (in the permuted order) of the first of sub-block k's 16 quants: element
   128h + 32j + l sits at 64j + 32h + l, sub-block k = elements 16k..16k+15 (h = k/8, j = k/2 % 4). */
static inline int ws_amx_sub_pos(int k) { return 64 * ((k / 2) % 4) + 32 * (k / 8) + 16 * (k % 2); }

/* Activation rows r0..r0+15 (those < n) of Q8_K (qs int8[n][cols] permuted, dq float[n][nb])
   -> nb blocks of B / B2 / dx at dst (WS_AMX_XBLK bytes each); missing rows are zeros. */
static void ws_amx_pack_act(const int8_t *qs, const float *dq, int64_t n, int64_t nb, int64_t r0,
                            uint8_t *dst) {
    const int64_t cols = 256 * nb;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = dst + b * WS_AMX_XBLK;
        int8_t *b2 = (int8_t *)(blk + 4096);
        float *dx = (float *)(blk + 4096 + 512);
        memset(blk, 0, WS_AMX_XBLK);
        for (int r = 0; r < 16 && r0 + r < n; r++) {
            const int8_t *q = qs + (r0 + r) * cols + 256 * b;
            for (int kk = 0; kk < 64; kk++)           /* 4 consecutive K of row r: one dword */
                memcpy(blk + 64 * kk + 4 * r, q + 4 * kk, 4);
            for (int k = 0; k < 16; k++) {
                int s = 0;
                for (int i = 0; i < 16; i++) s += q[ws_amx_sub_pos(k) + i];
                b2[64 * (k / 4) + 4 * r + k % 4] = (int8_t)(s & 15);
                b2[64 * ((16 + k) / 4) + 4 * r + k % 4] = (int8_t)(s >> 4);   /* arithmetic */
            }
            dx[r] = dq[(r0 + r) * nb + b];
        }
    }
}

#if WS_KQ_AMX

/* Linux hands out AMX tile state only on request (once per process, all threads). */
static int ws_amx_request(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} ws_tilecfg;

/* tmm0 C1, tmm1 C2 (16 x 16 int32); tmm2 / tmm4 A (16 x 64 u8), tmm3 / tmm5 B (16 x 64);
   tmm6 A2 (16 x 32), tmm7 B2 (8 x 64). The config is per thread: loaded by each group call. */
static void ws_amx_config(void) {
    ws_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    c.rows[6] = 16; c.colsb[6] = 32;
    c.rows[7] = 8;  c.colsb[7] = 64;
    _tile_loadconfig(&c);
}

/* 16 weight rows (nrw valid, w row stride row_bytes) x nb blocks -> scratch (WS_AMX_WBLK each). */
static void ws_amx_unpack_q2k(const uint8_t *w, int64_t row_bytes, int64_t nb, int nrw,
                              uint8_t *scratch) {
    /* rows nrw..15 (a matrix's last group only) zeroed: their products are never stored. Every
       block's whole scratch zeroed for every group had been a third of the unpack (n = 16). */
    for (int64_t b = 0; b < nb && nrw < 16; b++) {
        uint8_t *s = scratch + b * WS_AMX_WBLK;
        float *dd = (float *)(s + 4096 + 512);
        for (int m = nrw; m < 16; m++) {
            memset(s + 256 * m, 0, 256);
            memset(s + 4096 + 32 * m, 0, 32);
            dd[m] = dd[16 + m] = 0.0f;
        }
    }
    for (int m = 0; m < nrw; m++) {
        const uint8_t *row = w + m * row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + 84 * b;
            uint8_t *s = scratch + b * WS_AMX_WBLK;
            ws_kq_prefetch_ahead(blk, 84, WS_KQ_PREFETCH);
            ws_ublk u;
            const float unused_dm[2] = {0.0f, 0.0f};   /* only u.w is used: d, dmin go to dd below */
            ws_unpack_q2k(blk, unused_dm, &u);
            for (int j = 0; j < 4; j++) _mm512_store_si512((void *)(s + 256 * m + 64 * j), u.w[j]);
            const __m128i mins = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)blk), 4),
                                               _mm_set1_epi8(15));
            _mm_store_si128((__m128i *)(s + 4096 + 32 * m), mins);
            _mm_store_si128((__m128i *)(s + 4096 + 32 * m + 16), _mm_slli_epi16(mins, 4));
            float *dd = (float *)(s + 4096 + 512);
            dd[m] = ws_inf_to_nan(_cvtsh_ss(ws_load_u16(blk + 80)));   /* Inf: NaN, as the reference */
            dd[16 + m] = ws_inf_to_nan(_cvtsh_ss(ws_load_u16(blk + 82)));
        }
    }
}

/* The tile products of one (weight block, activation block) into c[0..255] (C1), c[256..511] (C2).
   Tiles are not renamed: a load into a tile waits for the product still reading it, so the
   operands alternate between two pairs (tmm2/3, tmm4/5) and the next loads issue early
   (measured: 218 -> 90 ns per block-tile, one pair -> two). */
static inline __attribute__((always_inline)) void ws_amx_tiles(const uint8_t *wb, const uint8_t *xb,
                                                              int32_t *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(2, wb, 256);
    _tile_loadd(3, xb, 64);
    _tile_loadd(4, wb + 64, 256);
    _tile_loadd(5, xb + 1024, 64);
    _tile_dpbusd(0, 2, 3);
    _tile_loadd(6, wb + 4096, 32);
    _tile_loadd(7, xb + 4096, 64);
    _tile_loadd(2, wb + 128, 256);
    _tile_loadd(3, xb + 2048, 64);
    _tile_dpbusd(0, 4, 5);
    _tile_dpbusd(1, 6, 7);
    _tile_loadd(4, wb + 192, 256);
    _tile_loadd(5, xb + 3072, 64);
    _tile_dpbusd(0, 2, 3);
    _tile_dpbusd(0, 4, 5);
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
}

/* acc[m][:] += dx[:] * (d[m] * C1[m][:] - dmin[m] * C2[m][:]) */
static inline __attribute__((always_inline)) void ws_amx_scale(const int32_t *c, const uint8_t *wb,
                                                              const uint8_t *xb, __m512 acc[16]) {
    const float *d = (const float *)(wb + 4096 + 512);
    const __m512 dx = _mm512_load_ps((const float *)(xb + 4096 + 512));
    for (int m = 0; m < 16; m++) {
        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 16 * m))),
                                 _mm512_set1_ps(d[m]));
        t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 256 + 16 * m))),
                             _mm512_set1_ps(d[16 + m]), t);
        acc[m] = _mm512_fmadd_ps(t, dx, acc[m]);
    }
}

/* One 16 x 16 output tile over all nb blocks; out[n][m] for valid n < nrx, m < nrw. The tile
   products of block b go to one of two buffers while block b - 1's are scaled, so the AMX unit
   and the vector units overlap. */
static void ws_amx_tile_out(const uint8_t *scratch, const uint8_t *xact, int64_t nb, int nrw,
                            int nrx, float *out, int64_t ostride, int32_t *cbuf /* [2][512] */) {
    __m512 acc[16];
    for (int m = 0; m < 16; m++) acc[m] = _mm512_setzero_ps();
    ws_amx_tiles(scratch, xact, cbuf);
    for (int64_t b = 1; b < nb; b++) {
        ws_amx_tiles(scratch + b * WS_AMX_WBLK, xact + b * WS_AMX_XBLK, cbuf + 512 * (b & 1));
        ws_amx_scale(cbuf + 512 * ((b - 1) & 1), scratch + (b - 1) * WS_AMX_WBLK,
                     xact + (b - 1) * WS_AMX_XBLK, acc);
    }
    ws_amx_scale(cbuf + 512 * ((nb - 1) & 1), scratch + (nb - 1) * WS_AMX_WBLK,
                 xact + (nb - 1) * WS_AMX_XBLK, acc);
    float t[16][16] __attribute__((aligned(64)));   /* [m][n] -> out[n][m] */
    for (int m = 0; m < 16; m++) _mm512_store_ps(t[m], acc[m]);
    for (int r = 0; r < nrx; r++)
        for (int m = 0; m < nrw; m++) out[r * ostride + m] = t[m][r];
}

/* Weight rows i0..i0+nrw-1 (nrw <= 16) against activation groups g0..g1-1 (packed by
   ws_amx_pack_act, nb blocks each), n activation rows in all. scratch: nb * WS_AMX_WBLK bytes,
   cbuf: 1024 int32, both this thread's and 64-byte aligned. */
static void ws_amx_q2k_group(const uint8_t *w, int64_t row_bytes, int64_t nb, int64_t i0, int nrw,
                             const uint8_t *xact, int64_t g0, int64_t g1, int64_t n, float *out,
                             int64_t ostride, uint8_t *scratch, int32_t *cbuf) {
    ws_amx_unpack_q2k(w + i0 * row_bytes, row_bytes, nb, nrw, scratch);
    ws_amx_config();
    for (int64_t g = g0; g < g1; g++) {
        const int nrx = (int)(n - 16 * g < 16 ? n - 16 * g : 16);
        ws_amx_tile_out(scratch, xact + g * nb * WS_AMX_XBLK, nb, nrw, nrx,
                        out + 16 * g * ostride + i0, ostride, cbuf);
    }
    _tile_release();
}

#else  /* no AMX in this build: never called (AMX = False in the module) */

static int ws_amx_request(void) { return 0; }
static void ws_amx_q2k_group(const uint8_t *w, int64_t row_bytes, int64_t nb, int64_t i0, int nrw,
                             const uint8_t *xact, int64_t g0, int64_t g1, int64_t n, float *out,
                             int64_t ostride, uint8_t *scratch, int32_t *cbuf) {
    (void)w; (void)row_bytes; (void)nb; (void)i0; (void)nrw; (void)xact; (void)g0; (void)g1;
    (void)n; (void)out; (void)ostride; (void)scratch; (void)cbuf;
}

#endif
#endif /* WS_KQUANTS_AMX_H */
