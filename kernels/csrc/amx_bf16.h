/* AMX-BF16 tiles for k-quant matrix-matrix products with many activation rows (prefill), used by
 * kernels/_amx.pyx.
 *
 * The int8 tiles (kquants_amx.h) need each weight already times its sub-block scale as one byte,
 * which only Q2_K has (q * sc <= 45); Q3_K..Q6_K's q * sc needs 10-13 bits, so their int8
 * products would be one tile product per sub-block, each scaled in vector code. Here every weight
 * is expanded instead, once per 32-row task and chunk of activation rows, to bfloat16 (d * sc *
 * q - g, from the same block unpack as the AVX-512 kernels), the activations are rounded to
 * bfloat16 once per call, and the tile products accumulate in float32 over the whole row: no
 * per-block scaling at all.
 *
 * Numerics: not the Q8_K path. Each weight and each activation is rounded to bfloat16 (8
 * significant bits, round to nearest even; relative error <= 2^-9 each), the products are exact
 * and summed in float32: NMSE ~5e-6 against the float reference, below the ~5e-5 that Q8_K's
 * activation rounding alone gives (the int8 kernels, llama.cpp's); tests/test_amx_bf16.py bounds it.
 *
 * Layouts (C[m][n] = sum_k A[m][k] B[k][n], tdpbf16ps: A 16 x 32 bf16, B 16 pairs x 16 x 2):
 *   weights   A: per K step of 32 columns, 2 KiB: the task's 32 rows of 64 bytes (tile-major:
 *                a row-major bf16[32][cols] put the 16 rows of a tile load 2 cols bytes apart,
 *                the same L1 set for cols = 2048, and ran ~4x slower); each row in the order the
 *                activations are packed (Q2_K: WS_KQ_PERMUTED's order within each block)
 *   activations B: per group of 16 rows and K step of 32 columns, 1 KiB: pair p (columns 2p,
 *                2p + 1 of the step) of row r at byte 64 p + 4 r; rows past n are zeros
 *   results   C: float[16 weight rows][16 activation rows], written out transposed
 * Tiles: tmm0..3 C (weight group a, activation group b: tmm 2a + b), tmm4/5 A, tmm6/7 B.
 */
#ifndef WS_AMX_BF16_H
#define WS_AMX_BF16_H

#include "kquants_simd.h"

#if WS_KQ_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define WS_AMX_BF16 1
#include <unistd.h>
#include <sys/syscall.h>
#else
#define WS_AMX_BF16 0
#endif

#define WS_AB_TASK 32        /* weight rows a task expands and multiplies (two tile groups) */

/* Bytes of the packed activations of n rows (groups of 16, padded to an even count) x cols. */
static inline int64_t ws_ab_act_bytes(int64_t n, int64_t cols) {
    const int64_t groups = ((n + 31) / 32) * 2;
    return groups * (cols / 32) * 1024;
}

#if WS_AMX_BF16

static int ws_ab_request(void) {   /* Linux grants the tile state on request (once per process) */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* v[m][r] -> v[r][m] for a 16 x 16 block of 32-bit lanes: the activations' pairs into the
   tiles' layout, and a result tile written out as 16 vector stores into the output rows (1024
   scalar stores a pair of tile groups filled the store buffer, each missing cache on an output
   row: half the tile time of a 12352-row projection). */
WS_AI void ws_ab_transpose16(__m512 v[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {   /* lane L: rows 2i, 2i+1 interleaved, columns 4L+0,1 / 4L+2,3 */
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {   /* v[4i + j], lane L: rows 4i..4i+3 of column 4L + j */
        v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
        v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    }
    for (int j = 0; j < 4; j++) {   /* column 4L + j: lane L of v[j], v[4 + j], v[8 + j], v[12 + j] */
        const __m512 u0 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x44), u1 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x44);
        const __m512 w0 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xEE), w1 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(u0, u1, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(u0, u1, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(w0, w1, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
    }
    for (int i = 0; i < 16; i++) v[i] = t[i];
}

/* Activation rows 16 g .. 16 g + 15 (those < n) of x (float[n][cols]) -> group g's cols / 32
   tiles at dst. permuted: Q2_K's order (step s of a block takes elements 128 h + 32 j .. + 31,
   s = 2 j + h: position 64 j + 32 h + l holds element 128 h + 32 j + l). Each step's 16 rows of
   16 bf16 pairs are transposed in registers into the tile's 16 rows of 16 pairs. */
static void ws_ab_pack_act(const float *x, int64_t n, int64_t cols, int64_t g, int permuted,
                           uint8_t *dst) {
    const int64_t steps = cols / 32;
    for (int64_t s = 0; s < steps; s++) {
        int64_t src = 32 * s;
        if (permuted) {
            const int64_t b = s / 8, j = (s % 8) / 2, h = s % 2;
            src = 256 * b + 128 * h + 32 * j;
        }
        __m512 v[16];   /* row r: its 16 pairs (2 bf16 each) of the step, as 32-bit lanes */
        for (int r = 0; r < 16; r++) {
            const int64_t i = 16 * g + r;
            if (i < n) {
                const float *p = x + i * cols + src;
                v[r] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
            } else {
                v[r] = _mm512_setzero_ps();
            }
        }
        ws_ab_transpose16(v);   /* v[q]: pair q of rows 0..15 */
        for (int q = 0; q < 16; q++) _mm512_store_ps((float *)(dst + s * 1024 + 64 * q), v[q]);
    }
}

/* One unpacked block as bf16: 256 values d * sc * q' - g into the 8 steps' 64-byte rows at
   ob + 2048 s (s < 8), in the order the activations are packed. */
WS_AI void ws_ab_block(const int qtype, const uint8_t *blk, const float *bdm, uint8_t *ob) {
    const int q2 = qtype == WS_Q2_K;
    float sf[16] __attribute__((aligned(64)));   /* d * scale of sub-block k */
    float gf[16] __attribute__((aligned(64)));   /* constant term g of sub-block k */
    ws_ublk u;
    ws_kq_unpack(qtype, blk, bdm, &u);
    if (q2) {   /* codes already times their scale */
        _mm512_store_ps(sf, u.d);
    } else {
        /* the scale of each 16 values, k = 0..15, from u.s[0..1] in ws_kq_block_dot's packed
           order: words 0 and 4 of each 128-bit lane */
        const __m512i pick = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                              60, 52, 44, 36, 56, 48, 40, 32, 28, 20, 12, 4, 24, 16, 8, 0);
        const __m256i sc16 = _mm512_castsi512_si256(_mm512_permutex2var_epi16(u.s[0], pick, u.s[1]));
        _mm512_store_ps(sf, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(sc16)), u.d));
    }
    /* g_k = dmin m_k (Q3_K / Q6_K: d times the 4 sc_k / 32 sc_k ws_ublk.m holds), as ws_kq_row_term's
       integer constant term in float: the same products as 4d sc_k / 32d sc_k (x4, x32 exact) */
    _mm512_store_ps(gf, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(u.m)), _mm512_set1_ps(bdm[1])));
    /* read sf / gf back from memory: broadcasts from memory are load-port uops, where the
       compiler otherwise moves each value through a general register (two ALU uops, 32 a block) */
    __asm__ volatile("" ::: "memory");
    for (int p = 0; p < 4; p++) {   /* zmm p: steps 2 p and 2 p + 1 */
        __m512 f[4];
        for (int l = 0; l < 4; l++) {
            /* lane l of zmm p: sub-block 4 p + l, or Q2_K's 8 (l / 2) + 2 p + l % 2 */
            const int k = q2 ? 8 * (l / 2) + 2 * p + l % 2 : 4 * p + l;
            const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(u.w[p], l)));
            f[l] = _mm512_fmsub_ps(v, _mm512_set1_ps(q2 ? sf[0] : sf[k]), _mm512_set1_ps(gf[k]));
        }
        _mm512_store_si512((void *)(ob + 2048 * 2 * p), (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
        _mm512_store_si512((void *)(ob + 2048 * (2 * p + 1)), (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
    }
}

/* Weight rows i0 .. i0 + nrw - 1 (nrw <= 32; w: uint8[rows][row_bytes], nb blocks a row) ->
   bf16 at a, tile-major (step s, row m at a + 2048 s + 64 m); rows nrw..31 zeros. Block column
   by block column, every row's block in turn: the 16 KiB of a column's 8 steps are written
   whole, one after another (row by row, each 64-byte store went to a line 2 KiB from the last,
   and the stores missed L1: 0.5 cycles a weight). */
static void ws_ab_expand(int qtype, const uint8_t *w, int64_t row_bytes, int64_t nb, int nrw,
                         uint8_t *a) {
    const int bb = ws_block_bytes(qtype);
    float dm[WS_AB_TASK][32] __attribute__((aligned(64)));   /* per row: 8 blocks' (d, dmin) */
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t cnt = nb - b0 < 8 ? nb - b0 : 8;
        for (int m = 0; m < nrw; m++)
            ws_kq_scales(qtype, w + m * row_bytes + b0 * bb, cnt, NULL, dm[m]);
        for (int64_t b = b0; b < b0 + cnt; b++) {
            uint8_t *ob = a + 2048 * 8 * b;
            for (int m = 0; m < nrw; m++) {
                const uint8_t *blk = w + m * row_bytes + b * bb;
                ws_kq_prefetch_ahead(blk, bb, 4 * bb);   /* the row, 4 blocks on */
                ws_ab_block(qtype, blk, dm[m] + 2 * (b - b0), ob + 64 * m);
            }
            for (int m = nrw; m < WS_AB_TASK; m++)
                for (int s = 0; s < 8; s++) memset(ob + 2048 * s + 64 * m, 0, 64);
        }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} ws_ab_tilecfg;

static void ws_ab_config(void) {
    ws_ab_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

/* One task: the expanded rows a (32, tile-major) times activation groups g0 .. g1 - 1 (an
   even count, packed at xact), into out[16 g + r][i0 + m] for r, m valid (n rows, nrw weight
   rows). cbuf: float[4][256] of this thread's, 64-byte aligned. */
static void ws_ab_task(const uint8_t *a, int64_t cols, const uint8_t *xact, int64_t g0, int64_t g1,
                       int64_t n, int nrw, float *out, int64_t ostride, int64_t i0, float *cbuf) {
    const int64_t steps = cols / 32;
    ws_ab_config();
    for (int64_t g = g0; g < g1; g += 2) {
        const uint8_t *b0 = xact + g * steps * 1024, *b1 = b0 + steps * 1024;
        /* the pair's output lines asked for (for writing) now, to arrive during its tile products:
           written cold at the end, they cost as much as a third of the products (a 12352-row
           projection, n = 512) */
        for (int64_t i = 16 * g; i < 16 * (g + 2) && i < n; i++) {
            _m_prefetchw(out + i * ostride + i0);
            if (nrw > 16) _m_prefetchw(out + i * ostride + i0 + 16);
        }
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, a + 2048 * s, 64);
            _tile_loadd(6, b0 + 1024 * s, 64);
            _tile_loadd(7, b1 + 1024 * s, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, a + 2048 * s + 1024, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, cbuf, 64);
        _tile_stored(1, cbuf + 256, 64);
        _tile_stored(2, cbuf + 512, 64);
        _tile_stored(3, cbuf + 768, 64);
        for (int t = 0; t < 4; t++) {   /* tile 2 wa + gb: weight rows 16 wa.., activation rows 16 (g + gb).. */
            const int wa = t / 2, gb = t % 2;
            const int mm = nrw - 16 * wa < 16 ? (nrw - 16 * wa > 0 ? nrw - 16 * wa : 0) : 16;
            if (mm == 0) continue;
            __m512 v[16];
            for (int m = 0; m < 16; m++) v[m] = _mm512_load_ps(cbuf + 256 * t + 16 * m);
            ws_ab_transpose16(v);   /* v[r] = C[0..15][r]: 16 outputs of activation row r */
            for (int r = 0; r < 16; r++) {
                const int64_t i = 16 * (g + gb) + r;
                if (i >= n) break;
                _mm512_mask_storeu_ps(out + i * ostride + i0 + 16 * wa, (__mmask16)((1u << mm) - 1u), v[r]);
            }
        }
    }
    _tile_release();
}

#else  /* no AMX-BF16 in this build: never called (AVAILABLE = False in the module) */

static int ws_ab_request(void) { return 0; }
static void ws_ab_pack_act(const float *x, int64_t n, int64_t cols, int64_t g, int permuted,
                           uint8_t *dst) {
    (void)x; (void)n; (void)cols; (void)g; (void)permuted; (void)dst;
}
static void ws_ab_expand(int qtype, const uint8_t *w, int64_t row_bytes, int64_t nb, int nrw,
                         uint8_t *a) {
    (void)qtype; (void)w; (void)row_bytes; (void)nb; (void)nrw; (void)a;
}
static void ws_ab_task(const uint8_t *a, int64_t cols, const uint8_t *xact, int64_t g0, int64_t g1,
                       int64_t n, int nrw, float *out, int64_t ostride, int64_t i0, float *cbuf) {
    (void)a; (void)cols; (void)xact; (void)g0; (void)g1; (void)n; (void)nrw; (void)out;
    (void)ostride; (void)i0; (void)cbuf;
}

#endif
#endif /* WS_AMX_BF16_H */
