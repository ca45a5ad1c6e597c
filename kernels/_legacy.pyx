# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Fused dequantize-matmul for the legacy 32-element block types and the float types.

``matmul_into(x, w, qtype, out, threads)``: ``out[n, rows] = x[n, cols] @ W.T`` where ``W`` is
``rows`` GGUF rows of ``qtype`` blocks (``w``: uint8[rows, row_bytes]). Public and checked;
everything below it trusts its arguments.

Quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), as llama.cpp's vec_dot kernels:

* Activations are quantized once per call, per 32 values, exactly as ``weightstream.kernels.quantize``'s
  ``quantize_q8_0`` (Q4_0 / Q5_0 / Q8_0) and ``quantize_q8_1`` (Q4_1 / Q5_1) do it: int8 quants,
  fp16-rounded ``d``; for Q8_1 also ``s = fp16(d * sum(q))``.
* Weights become *unsigned* bytes (Q4: nibble 0..15, Q5: 0..31, Q8_0: q + 128) so that one
  AVX-512 VNNI ``vpdpbusd`` (u8 x s8 -> int32) does 64 multiply-adds; the offset is folded into
  one float term per block: ``dw * c`` with ``c = -offset * dx * sum(q)`` (exact in float32:
  11 + 12 significant bits times a power of two). Q4_1 / Q5_1 add ``m * s`` instead.
* Per block: ``dw * dx * dot`` with dot an exact int32. Scales of 16 blocks at a time are one
  vector (a gather of the fp16 fields); a pair of blocks fills one 512-bit register.
* Decode (n <= 4): unpack and multiply in one pass over each weight row. Prefill: each thread
  unpacks a chunk of weight rows once into an L2 scratch (u8 per weight + float scales) and
  multiplies every 4-row tile of activations against it.
* Prefill on AMX-INT8 (``AMX``: built for it and Linux granted the tile state; n >= the cut-off
  of ``_amx_tuning``): activations repacked per 16 rows into the tiles' VNNI layout, each thread
  unpacks 16 weight rows at a time, one K = 32 tile product per block, scaled in AVX-512 floats
  (``_legacy_amx.h``). Offset types there use signed weights (tdpbssd), folding the offset into
  the exact int32 dot instead of a float term.
* Inside a 32-byte block the nibble types keep byte order "element k, element 16 + k"
  (what widening the packed bytes to 16 bits gives); the activations are stored in that order.

Float weights (F32, F16, BF16): float32 FMA, F16 via ``vcvtph2ps``, BF16 by a 16-bit shift.

Each output element is computed by one thread in a fixed order, so any thread count gives the
same bits. Without AVX-512 (F, BW, VL, VNNI) + F16C + BMI2 at compile time, portable scalar C
computes the same quantities (same activation quants, same per-block integer dots).
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int8_t, uint8_t
from libc.stddef cimport size_t

from gguf import GGMLQuantizationType as _T

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <stdlib.h>
    #include <string.h>
    #include <math.h>
    #if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__) && defined(__BMI2__)
    #define LG_SIMD 1
    #include <immintrin.h>
    #else
    #define LG_SIMD 0
    #endif

    #if defined(__GNUC__)
    #define LG_INLINE static inline __attribute__((always_inline))
    #else
    #define LG_INLINE static inline
    #endif

    enum { LG_F32 = 0, LG_F16 = 1, LG_Q4_0 = 2, LG_Q4_1 = 3, LG_Q5_0 = 6, LG_Q5_1 = 7, LG_Q8_0 = 8, LG_BF16 = 30 };

    static int lg_simd(void) { return LG_SIMD; }
    /* Bytes ahead of the weights being read that each thread prefetches: one core's hardware
       prefetcher alone keeps too few lines in flight to stream at the memory's rate (the same
       measurement as WS_KQ_PREFETCH in _kquants_simd.h). Rows of a chunk are contiguous. */
    #ifndef LG_PREFETCH
    #define LG_PREFETCH 2048
    #endif

    /* bytes per block (32 elements; 1 element for the float types) */
    LG_INLINE int lg_bs(int t) {
        switch (t) {
        case LG_Q4_0: return 18; case LG_Q4_1: return 20; case LG_Q5_0: return 22;
        case LG_Q5_1: return 24; case LG_Q8_0: return 34; case LG_F32: return 4;
        default: return 2;
        }
    }
    /* offset of the quants and of qh inside a block */
    LG_INLINE int lg_qs_off(int t) {
        switch (t) { case LG_Q4_0: return 2; case LG_Q4_1: return 4; case LG_Q5_0: return 6; case LG_Q5_1: return 8; default: return 2; }
    }
    LG_INLINE int lg_qh_off(int t) { return t == LG_Q5_0 ? 2 : 4; }
    /* Q4_1 / Q5_1 carry a min (use Q8_1's s); the others an offset folded via sum(q) */
    LG_INLINE int lg_has_min(int t) { return t == LG_Q4_1 || t == LG_Q5_1; }
    LG_INLINE int lg_offset(int t) { return t == LG_Q4_0 ? 8 : t == LG_Q5_0 ? 16 : t == LG_Q8_0 ? 128 : 0; }
    LG_INLINE int lg_interleaved(int t) { return t != LG_Q8_0; }

    typedef union { float f; uint32_t u; } lg_f32;

    static inline uint16_t lg_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline uint32_t lg_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

    /* IEEE binary16 -> binary32, exact (finite inputs; inf/nan kept) */
    static inline float lg_h2f(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        uint32_t em = h & 0x7FFFu;
        lg_f32 r;
        if (em >= 0x7C00u) r.u = sign | 0x7F800000u | ((em & 0x3FFu) << 13);
        else if (em >= 0x0400u) r.u = sign | ((em << 13) + ((127u - 15u) << 23));
        else { r.f = (float)em * 0x1p-24f; r.u |= sign; }
        return r.f;
    }
    /* binary32 -> binary16 -> binary32, round to nearest even (NumPy's astype(float16)) */
    static inline float lg_round_f16(float f) {
    #if LG_SIMD
        return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    #else
        lg_f32 x; x.f = f;
        uint32_t sign = x.u & 0x80000000u, ax = x.u & 0x7FFFFFFFu;
        lg_f32 r;
        if (ax >= 0x7F800000u) return f;                          /* inf / nan */
        if (ax >= 0x477FF000u) { r.u = sign | 0x7F800000u; return r.f; }   /* rounds to inf */
        if (ax < 0x38800000u) {                                  /* half subnormal: units of 2^-24 */
            lg_f32 a; a.u = ax;
            float q = nearbyintf(a.f * 0x1p24f);
            r.f = q * 0x1p-24f; r.u |= sign; return r.f;
        }
        uint32_t t = ax + 0xFFFu + ((ax >> 13) & 1u);             /* round mantissa to 10 bits, RNE */
        r.u = sign | (t & 0xFFFFE000u);
        return r.f;
    #endif
    }

    /* ---------------------------------------------------------------------------------
       Activations: one row of cols = 32 * nb floats -> xq int8[nbp * 32], dx[nbp], cs[nbp]
       (nbp = nb rounded up to 16; padding is zero). cs = s (min types) or -off * dx * sum(q).
       ---------------------------------------------------------------------------------- */
    static void lg_quantize_row(int t, const float *x, int nb, int nbp, int8_t *xq, float *dx, float *cs) {
        const int inter = lg_interleaved(t), has_min = lg_has_min(t), off = lg_offset(t);
        for (int b = 0; b < nb; b++) {
            const float *v = x + 32 * (size_t)b;
            int8_t *q = xq + 32 * (size_t)b;
            float d, id;
            int isum = 0;
    #if LG_SIMD
            __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
            d = amax / 127.0f;
            id = d != 0.0f ? 1.0f / d : 0.0f;
            const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(0.5f);
            const __m512i signbit = _mm512_set1_epi32((int)0x80000000u);
            __m512 s0 = _mm512_mul_ps(a0, vid), s1 = _mm512_mul_ps(a1, vid);
            /* sign(s) * floor(|s| + 0.5f), in float32 as NumPy does */
            __m512 r0 = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(s0), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512 r1 = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(s1), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            r0 = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r0), _mm512_and_si512(_mm512_castps_si512(s0), signbit)));
            r1 = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r1), _mm512_and_si512(_mm512_castps_si512(s1), signbit)));
            __m512i i0 = _mm512_cvttps_epi32(r0), i1 = _mm512_cvttps_epi32(r1);
            isum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            __m128i b0 = _mm512_cvtepi32_epi8(i0), b1 = _mm512_cvtepi32_epi8(i1);
            if (inter) { __m128i t0 = _mm_unpacklo_epi8(b0, b1), t1 = _mm_unpackhi_epi8(b0, b1); b0 = t0; b1 = t1; }
            _mm_storeu_si128((__m128i *)q, b0);
            _mm_storeu_si128((__m128i *)(q + 16), b1);
    #else
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) { float a = fabsf(v[j]); if (a > amax) amax = a; }
            d = amax / 127.0f;
            id = d != 0.0f ? 1.0f / d : 0.0f;
            int8_t tmp[32];
            for (int j = 0; j < 32; j++) {
                volatile float s = v[j] * id;          /* no contraction into the add below */
                float a = floorf(fabsf(s) + 0.5f);
                int qi = (int)a;
                tmp[j] = (int8_t)(s < 0.0f ? -qi : qi);
                isum += tmp[j];
            }
            for (int j = 0; j < 16; j++) {
                if (inter) { q[2 * j] = tmp[j]; q[2 * j + 1] = tmp[16 + j]; }
                else { q[j] = tmp[j]; q[16 + j] = tmp[16 + j]; }
            }
    #endif
            float dr = lg_round_f16(d);
            dx[b] = dr;
            if (has_min) cs[b] = lg_round_f16(d * (float)isum);
            else cs[b] = dr * (float)(-off * isum);
        }
        for (int b = nb; b < nbp; b++) {
            memset(xq + 32 * (size_t)b, 0, 32);
            dx[b] = 0.0f; cs[b] = 0.0f;
        }
    }

    /* ---------------------------------------------------------------------------------
       Weights -> unsigned bytes in the activations' order, 64 per pair of blocks.
       ---------------------------------------------------------------------------------- */
    #if LG_SIMD
    /* the pair of blocks at p (two = 0: only the first exists; the second reads as zeros) */
    LG_INLINE __m512i lg_unpack_pair(const int t, const uint8_t *p, int two) {
        const int bs = lg_bs(t);
        if (t == LG_Q8_0) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(p + 2));
            __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(p + bs + 2)) : _mm256_setzero_si256();
            return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8((char)0x80));
        }
        const int qo = lg_qs_off(t);
        __m128i lo = _mm_loadu_si128((const __m128i *)(p + qo));
        __m128i hi = two ? _mm_loadu_si128((const __m128i *)(p + bs + qo)) : _mm_setzero_si128();
        __m512i w = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
        /* 16-bit word k = byte b: low byte = b & 15 (element k), high byte = b >> 4 (element 16 + k) */
        __m512i v = _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
        if (t == LG_Q5_0 || t == LG_Q5_1) {
            const int ho = lg_qh_off(t);
            uint32_t h0 = lg_u32(p + ho), h1 = two ? lg_u32(p + bs + ho) : 0u;
            uint64_t m0 = _pdep_u32(h0 & 0xFFFFu, 0x55555555u) | _pdep_u32(h0 >> 16, 0xAAAAAAAAu);
            uint64_t m1 = _pdep_u32(h1 & 0xFFFFu, 0x55555555u) | _pdep_u32(h1 >> 16, 0xAAAAAAAAu);
            v = _mm512_mask_add_epi8(v, (__mmask64)(m0 | (m1 << 32)), v, _mm512_set1_epi8(16));
        }
        return v;
    }
    /* fp16 d (and m) of up to 16 blocks from p: one 32-bit gather of each block's first bytes */
    LG_INLINE void lg_scales16(const int t, const uint8_t *p, int k, __m512 *dw, __m512 *cw) {
        const int bs = lg_bs(t);
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bs));
        __mmask16 km = k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << k) - 1u);
        __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, idx, (const void *)p, 1);
        *dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        if (lg_has_min(t)) *cw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
        else *cw = *dw;
    }
    #endif

    /* one weight row -> ubuf u8[nbp * 32], dwb[nbp], cwb[nbp] (zero padded) */
    static void lg_unpack_row(int t, const uint8_t *w, int nb, int nbp, uint8_t *ubuf, float *dwb, float *cwb) {
        const int bs = lg_bs(t);
    #if LG_SIMD
        for (int b = 0; b < nb; b += 2)
            _mm512_storeu_si512((void *)(ubuf + 32 * (size_t)b), lg_unpack_pair(t, w + (size_t)b * bs, b + 1 < nb));
        for (int b = nb + (nb & 1); b < nbp; b += 2) _mm512_storeu_si512((void *)(ubuf + 32 * (size_t)b), _mm512_setzero_si512());
        for (int g = 0; g < nbp; g += 16) {
            __m512 dw, cw;
            int k = nb - g;
            if (k <= 0) { dw = cw = _mm512_setzero_ps(); }
            else lg_scales16(t, w + (size_t)g * bs, k, &dw, &cw);
            _mm512_storeu_ps(dwb + g, dw); _mm512_storeu_ps(cwb + g, cw);
        }
    #else
        const int qo = lg_qs_off(t), inter = lg_interleaved(t), off = lg_offset(t);
        memset(ubuf, 0, 32 * (size_t)nbp);
        for (int b = 0; b < nbp; b++) { dwb[b] = 0.0f; cwb[b] = 0.0f; }
        for (int b = 0; b < nb; b++) {
            const uint8_t *p = w + (size_t)b * bs;
            uint8_t *u = ubuf + 32 * (size_t)b;
            uint8_t e[32];
            if (t == LG_Q8_0) { for (int j = 0; j < 32; j++) e[j] = (uint8_t)(p[2 + j] ^ 0x80u); }
            else {
                for (int j = 0; j < 16; j++) { e[j] = p[qo + j] & 15u; e[16 + j] = p[qo + j] >> 4; }
                if (t == LG_Q5_0 || t == LG_Q5_1) {
                    uint32_t h = lg_u32(p + lg_qh_off(t));
                    for (int j = 0; j < 32; j++) e[j] |= (uint8_t)(((h >> j) & 1u) << 4);
                }
            }
            for (int j = 0; j < 16; j++) {
                if (inter) { u[2 * j] = e[j]; u[2 * j + 1] = e[16 + j]; }
                else { u[j] = e[j]; u[16 + j] = e[16 + j]; }
            }
            dwb[b] = lg_h2f(lg_u16(p));
            cwb[b] = lg_has_min(t) ? lg_h2f(lg_u16(p + 2)) : dwb[b];
        }
        (void)off;
    #endif
    }

    /* ---------------------------------------------------------------------------------
       Dot products of one weight row with R activation rows.
       fused: read blocks from wrow directly; else from the unpacked ubuf / dwb / cwb.
       xq / dx / cs: activation row 0, next rows xs bytes / fs floats further.
       out[r * os] = result for activation row r.
       ---------------------------------------------------------------------------------- */
    #if LG_SIMD
    LG_INLINE void lg_dot_tile(const int t, const int fused, const int R,
                               const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb,
                               int nb, const int8_t *xq, const float *dx, const float *cs,
                               size_t xs, size_t fs, float *out, size_t os, int accum) {
        const int bs = lg_bs(t);
        __m512 acc[4][2], acc2[4];
        for (int r = 0; r < R; r++) { acc[r][0] = acc[r][1] = acc2[r] = _mm512_setzero_ps(); }
        const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i zero = _mm512_setzero_si512();
        for (int g = 0; g < nb; g += 16) {
            const int k = nb - g < 16 ? nb - g : 16;
            __m512 dw, cw, S[4];
            if (fused) {  /* prefetch: see LG_PREFETCH */
                for (int o = 0; o < 16 * bs; o += 64)
                    _mm_prefetch((const char *)wrow + (size_t)g * bs + LG_PREFETCH + o, _MM_HINT_T0);
                lg_scales16(t, wrow + (size_t)g * bs, k, &dw, &cw);
            }
            else { dw = _mm512_loadu_ps(dwb + g); cw = _mm512_loadu_ps(cwb + g); }
            for (int r = 0; r < R; r++) {
                S[r] = _mm512_mul_ps(dw, _mm512_loadu_ps(dx + r * fs + g));
                acc2[r] = _mm512_fmadd_ps(cw, _mm512_loadu_ps(cs + r * fs + g), acc2[r]);
            }
            const int np = (k + 1) >> 1;
            int j = 0;
            #define LG_PAIR(J, A) do { \\
                    const int blk = g + 2 * (J); \\
                    __m512i wv = fused ? lg_unpack_pair(t, wrow + (size_t)blk * bs, blk + 1 < nb) \\
                                       : _mm512_loadu_si512((const void *)(ubuf + 32 * (size_t)blk)); \\
                    __m512i ix = _mm512_add_epi32(base, _mm512_set1_epi32(2 * (J))); \\
                    for (int r = 0; r < R; r++) { \\
                        __m512i d = _mm512_dpbusd_epi32(zero, wv, _mm512_loadu_si512((const void *)(xq + r * xs + 32 * (size_t)blk))); \\
                        acc[r][A] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(ix, S[r]), acc[r][A]); \\
                    } \\
                } while (0)
            for (; j + 2 <= np; j += 2) { LG_PAIR(j, 0); LG_PAIR(j + 1, 1); }
            if (j < np) LG_PAIR(j, 0);
            #undef LG_PAIR
        }
        for (int r = 0; r < R; r++)
            out[r * os] = (accum ? out[r * os] : 0.0f) + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), acc2[r]));
    }
    #else
    LG_INLINE void lg_dot_tile(const int t, const int fused, const int R,
                               const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb,
                               int nb, const int8_t *xq, const float *dx, const float *cs,
                               size_t xs, size_t fs, float *out, size_t os, int accum) {
        (void)t; (void)fused; (void)wrow;
        for (int r = 0; r < R; r++) {
            const int8_t *xr = xq + r * xs;
            float acc = 0.0f, acc2 = 0.0f;
            for (int b = 0; b < nb; b++) {
                int32_t d = 0;
                const uint8_t *u = ubuf + 32 * (size_t)b;
                const int8_t *a = xr + 32 * (size_t)b;
                for (int j = 0; j < 32; j++) d += (int32_t)u[j] * (int32_t)a[j];
                acc += (float)d * (dwb[b] * dx[r * fs + b]);
                acc2 += cwb[b] * cs[r * fs + b];
            }
            out[r * os] = (accum ? out[r * os] : 0.0f) + (acc + acc2);
        }
    }
    #endif

    /* ---------------------------------------------------------------------------------
       Float weights: out[r * os] = sum_k x[r][k] * w[k] for R activation rows.
       ---------------------------------------------------------------------------------- */
    #if LG_SIMD
    LG_INLINE __m512 lg_fload(const int t, const uint8_t *w, int k) {
        if (t == LG_F32) return _mm512_loadu_ps((const float *)w + k);
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + 2 * (size_t)k));
        if (t == LG_F16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    LG_INLINE __m512 lg_fload_mask(const int t, const uint8_t *w, int k, __mmask16 m) {
        if (t == LG_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + k);
        __m256i h = _mm256_maskz_loadu_epi16(m, (const void *)(w + 2 * (size_t)k));
        if (t == LG_F16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    LG_INLINE void lg_fdot_tile(const int t, const int R, const uint8_t *w, int cols,
                                const float *x, size_t xs, float *out, size_t os) {
        __m512 acc[4][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        int k = 0;
        const int esz = t == LG_F32 ? 4 : 2;
        for (; k + 32 <= cols; k += 32) {
            for (int o = 0; o < 32 * esz; o += 64)
                _mm_prefetch((const char *)w + (size_t)k * esz + LG_PREFETCH + o, _MM_HINT_T0);
            __m512 w0 = lg_fload(t, w, k), w1 = lg_fload(t, w, k + 16);
            for (int r = 0; r < R; r++) {
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * xs + k), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * xs + k + 16), acc[r][1]);
            }
        }
        for (; k < cols; k += 16) {
            int left = cols - k;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            __m512 w0 = lg_fload_mask(t, w, k, m);
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + r * xs + k), acc[r][0]);
        }
        for (int r = 0; r < R; r++) out[r * os] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    }
    #else
    LG_INLINE void lg_fdot_tile(const int t, const int R, const uint8_t *w, int cols,
                                const float *x, size_t xs, float *out, size_t os) {
        for (int r = 0; r < R; r++) {
            float acc = 0.0f;
            for (int k = 0; k < cols; k++) {
                float wk;
                if (t == LG_F32) memcpy(&wk, w + 4 * (size_t)k, 4);
                else if (t == LG_F16) wk = lg_h2f(lg_u16(w + 2 * (size_t)k));
                else { lg_f32 c; c.u = (uint32_t)lg_u16(w + 2 * (size_t)k) << 16; wk = c.f; }
                acc += wk * x[r * xs + k];
            }
            out[r * os] = acc;
        }
    }
    #endif

    /* ---------------------------------------------------------------------------------
       Dispatch: constant (type, fused, R) instantiations of the inline kernels.
       ---------------------------------------------------------------------------------- */
    #define LG_DOT_ARGS wrow, ubuf, dwb, cwb, nb, xq, dx, cs, xs, fs, out, os, accum
    #define LG_DOT_R(T, F) switch (R) { case 1: lg_dot_tile(T, F, 1, LG_DOT_ARGS); break; case 2: lg_dot_tile(T, F, 2, LG_DOT_ARGS); break; case 3: lg_dot_tile(T, F, 3, LG_DOT_ARGS); break; default: lg_dot_tile(T, F, 4, LG_DOT_ARGS); break; }
    #define LG_DOT_FN(NAME, T) static void NAME(int fused, int R, const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb, int nb, const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs, float *out, size_t os, int accum) { if (fused) { LG_DOT_R(T, 1) } else { LG_DOT_R(T, 0) } }
    LG_DOT_FN(lg_dot_q4_0, LG_Q4_0)
    LG_DOT_FN(lg_dot_q4_1, LG_Q4_1)
    LG_DOT_FN(lg_dot_q5_0, LG_Q5_0)
    LG_DOT_FN(lg_dot_q5_1, LG_Q5_1)
    LG_DOT_FN(lg_dot_q8_0, LG_Q8_0)

    typedef void (*lg_dot_fn)(int, int, const uint8_t *, const uint8_t *, const float *, const float *, int,
                              const int8_t *, const float *, const float *, size_t, size_t, float *, size_t, int);
    static lg_dot_fn lg_dot_for(int t) {
        switch (t) {
        case LG_Q4_0: return lg_dot_q4_0; case LG_Q4_1: return lg_dot_q4_1; case LG_Q5_0: return lg_dot_q5_0;
        case LG_Q5_1: return lg_dot_q5_1; default: return lg_dot_q8_0;
        }
    }

    #define LG_FDOT_R(T) switch (R) { case 1: lg_fdot_tile(T, 1, w, cols, x, xs, out, os); break; case 2: lg_fdot_tile(T, 2, w, cols, x, xs, out, os); break; case 3: lg_fdot_tile(T, 3, w, cols, x, xs, out, os); break; default: lg_fdot_tile(T, 4, w, cols, x, xs, out, os); break; }
    static void lg_fdot(int t, int R, const uint8_t *w, int cols, const float *x, size_t xs, float *out, size_t os) {
        if (t == LG_F32) { LG_FDOT_R(LG_F32) } else if (t == LG_F16) { LG_FDOT_R(LG_F16) } else { LG_FDOT_R(LG_BF16) }
    }

    /* ---------------------------------------------------------------------------------
       One call's state and the work of one chunk of weight rows [r0, r1).
       ---------------------------------------------------------------------------------- */
    typedef struct {
        int t, n, rows, cols, nb, nbp, fused, wb;
        const uint8_t *w; size_t w_stride;
        const float *x; size_t x_stride;
        const int8_t *xq; const float *dx; const float *cs; size_t xs, fs;
        float *out; size_t o_stride;
        uint8_t *scratch; size_t scratch_bytes;    /* per thread */
    } lg_ctx;

    #define LG_TILE 4
    #define LG_CB 128

    static void lg_chunk(const lg_ctx *c, int r0, int r1, int tid) {
        if (r1 > c->rows) r1 = c->rows;
        if (c->t == LG_F32 || c->t == LG_F16 || c->t == LG_BF16) {
            for (int i0 = 0; i0 < c->n; i0 += LG_TILE) {
                int R = c->n - i0 < LG_TILE ? c->n - i0 : LG_TILE;
                for (int row = r0; row < r1; row++)
                    lg_fdot(c->t, R, c->w + (size_t)row * c->w_stride, c->cols, c->x + (size_t)i0 * c->x_stride,
                            c->x_stride, c->out + (size_t)i0 * c->o_stride + row, c->o_stride);
            }
            return;
        }
        lg_dot_fn dot = lg_dot_for(c->t);
        const int bs = lg_bs(c->t);
        /* Decode: whole rows, one sequential weight stream (slicing columns as prefill does
           measured slower here: 16 interleaved row streams). */
        if (c->fused) {
            for (int b0 = 0; b0 < c->nb; b0 += c->nb) {
                const int k = c->nb;
                for (int row = r0; row < r1; row++)
                    for (int i0 = 0; i0 < c->n; i0 += LG_TILE) {
                        int R = c->n - i0 < LG_TILE ? c->n - i0 : LG_TILE;
                        dot(1, R, c->w + (size_t)row * c->w_stride + (size_t)b0 * bs, NULL, NULL, NULL, k,
                            c->xq + (size_t)i0 * c->xs + 32 * (size_t)b0, c->dx + (size_t)i0 * c->fs + b0,
                            c->cs + (size_t)i0 * c->fs + b0, c->xs, c->fs,
                            c->out + (size_t)i0 * c->o_stride + row, c->o_stride, b0 > 0);
                    }
            }
            return;
        }
        /* prefill: unpack rows [r0, r1) once, then every activation tile against them */
        uint8_t *ub = c->scratch + (size_t)tid * c->scratch_bytes;
        const size_t ubytes = 32 * (size_t)c->nbp;
        float *fb = (float *)(ub + ubytes * c->wb);
        for (int row = r0; row < r1; row++) {
            int i = row - r0;
            lg_unpack_row(c->t, c->w + (size_t)row * c->w_stride, c->nb, c->nbp, ub + ubytes * i,
                          fb + (size_t)2 * c->nbp * i, fb + (size_t)2 * c->nbp * i + c->nbp);
        }
        /* Prefill: columns in slices of LG_CB blocks (4096 values), so that a tile's activations
           (4 rows x 4 KiB int8) stay in L1 while the chunk's unpacked rows come from L2. */
        for (int b0 = 0; b0 < c->nb; b0 += LG_CB) {
            const int k = c->nb - b0 < LG_CB ? c->nb - b0 : LG_CB;
            for (int i0 = 0; i0 < c->n; i0 += LG_TILE) {
                int R = c->n - i0 < LG_TILE ? c->n - i0 : LG_TILE;
                for (int row = r0; row < r1; row++) {
                    int i = row - r0;
                    const float *dwb = fb + (size_t)2 * c->nbp * i;
                    dot(0, R, NULL, ub + ubytes * i + 32 * (size_t)b0, dwb + b0, dwb + c->nbp + b0, k,
                        c->xq + (size_t)i0 * c->xs + 32 * (size_t)b0, c->dx + (size_t)i0 * c->fs + b0,
                        c->cs + (size_t)i0 * c->fs + b0, c->xs, c->fs,
                        c->out + (size_t)i0 * c->o_stride + row, c->o_stride, b0 > 0);
                }
            }
        }
    }

    static void *lg_alloc(size_t bytes) {
        size_t b = (bytes + 63) / 64 * 64;
        return aligned_alloc(64, b ? b : 64);
    }
    """
    int lg_simd() noexcept nogil
    ctypedef struct lg_ctx:
        int t, n, rows, cols, nb, nbp, fused, wb
        const uint8_t *w
        size_t w_stride
        const float *x
        size_t x_stride
        const int8_t *xq
        const float *dx
        const float *cs
        size_t xs, fs
        float *out
        size_t o_stride
        uint8_t *scratch
        size_t scratch_bytes
    void lg_quantize_row(int t, const float *x, int nb, int nbp, int8_t *xq, float *dx, float *cs) noexcept nogil
    void lg_chunk(const lg_ctx *c, int r0, int r1, int tid) noexcept nogil
    void *lg_alloc(size_t nbytes) noexcept nogil

# AMX tiles for prefill; the header uses the helpers of the C block above (emitted before it)
cdef extern from "_legacy_amx.h" nogil:
    int LG_AMX_BLK
    int lg_amx_built()
    int lg_amx_request()
    void lg_amx_pack_act(const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs,
                         int n, int nb, int r0, uint8_t *dst)
    void lg_amx_group(int t, const uint8_t *w, size_t row_bytes, int nb, int i0, int nrw,
                      const uint8_t *xact, int g0, int g1, int n, float *out, size_t ostride,
                      uint8_t *scr)

from libc.stdlib cimport free

# gguf type value -> (elements per block, bytes per block)
cdef dict _BLOCKS = {
    int(_T.F32): (1, 4), int(_T.F16): (1, 2), int(_T.BF16): (1, 2),
    int(_T.Q4_0): (32, 18), int(_T.Q4_1): (32, 20), int(_T.Q5_0): (32, 22),
    int(_T.Q5_1): (32, 24), int(_T.Q8_0): (32, 34),
}

SUPPORTED = frozenset(_BLOCKS)
SIMD = bool(lg_simd())   # True when built with the AVX-512 VNNI kernels (else portable scalar C)

# n <= FUSED_MAX_N: unpack while multiplying (decode); above: unpack a chunk of rows once
FUSED_MAX_N = 4
# bytes of unpacked weight rows a thread keeps (its L2 share) in prefill
_SCRATCH_TARGET = 256 * 1024

# AMX tiles usable: compiled for AMX-INT8 and the tile state granted by the kernel (once per process)
AMX = bool(lg_amx_built()) and bool(lg_amx_request())
# quantized types with at least this many activation rows use the AMX tiles: all of prefill
# (n > FUSED_MAX_N). Measured, one thread, AMX vs AVX-512 unpacked: 3072x576 n = 5: 0.45 vs
# 0.58 ms, n = 8: 0.31 vs 0.42 ms; 14336x4096 n = 5: 9.5 vs 10.0 ms (Q4_1), even with 11 of 16
# tile rows padding
cdef int _AMX_MIN_N = 5
# L2 bytes of packed activations that one 16-row weight unpack serves (a chunk of 16-row groups)
cdef Py_ssize_t _AMX_ACT_L2 = 1 << 20


def _amx_tuning(min_n=None, act_l2=None):
    """Set / read the AMX constants (for tests and benchmarks): (smallest n for the AMX path, a
    huge value turns it off; L2 bytes of packed activations per chunk)."""
    global _AMX_MIN_N, _AMX_ACT_L2
    if min_n is not None:
        _AMX_MIN_N = max(1, min(int(min_n), 2**31 - 1))
    if act_l2 is not None:
        _AMX_ACT_L2 = max(1, int(act_l2))
    return _AMX_MIN_N, _AMX_ACT_L2


cdef void _matmul_amx(const lg_ctx *c, uint8_t *xact, uint8_t *scratch, int threads) noexcept nogil:
    """The quantized activations of c (c.xq / c.dx / c.cs) on AMX tiles: repack them per 16 rows
    (VNNI), then per chunk of 16-row groups whose packed activations fit _AMX_ACT_L2, the 16-row
    weight groups over the threads (each unpacks its group once per chunk). Each output is made by
    one thread over all blocks in order: threads do not change results.
    xact: uint8[groups of 16 rows][nb][LG_AMX_BLK]; scratch: uint8[threads][nb][LG_AMX_BLK]."""
    cdef Py_ssize_t blk_bytes = <Py_ssize_t>c.nb * LG_AMX_BLK
    cdef int ngx = (c.n + 15) // 16, ngw = (c.rows + 15) // 16
    cdef int per = <int>max(<Py_ssize_t>1, min(<Py_ssize_t>ngx, _AMX_ACT_L2 // blk_bytes))
    cdef int nch = (ngx + per - 1) // per
    cdef int g, ch, g0, g1
    per = (ngx + nch - 1) // nch       # balanced chunks
    for g in prange(ngx, num_threads=threads, schedule="static"):
        lg_amx_pack_act(c.xq, c.dx, c.cs, c.xs, c.fs, c.n, c.nb, 16 * g, xact + g * blk_bytes)
    for ch in range(nch):
        g0 = ch * per
        g1 = min(g0 + per, ngx)
        for g in prange(ngw, num_threads=threads, schedule="static"):
            lg_amx_group(c.t, c.w, c.w_stride, c.nb, 16 * g, min(16, c.rows - 16 * g), xact, g0, g1,
                         c.n, c.out, c.o_stride, scratch + threadid() * blk_bytes)


def quantize_rows(const float[:, ::1] x, int qtype):
    """The activation quantization matmul_into applies for `qtype` (for tests): (qs int8[n, cols]
    in element order, d float32[n, cols // 32], cs float32[n, cols // 32]) where cs is Q8_1's s
    for Q4_1 / Q5_1 and -offset * d * sum(qs) for Q4_0 (8), Q5_0 (16), Q8_0 (128)."""
    import numpy as np
    if qtype not in _BLOCKS or _BLOCKS[qtype][0] != 32:
        raise ValueError(f"quantize_rows: {qtype} is not a quantized type of weightstream.kernels._legacy")
    if x.shape[1] % 32:
        raise ValueError(f"quantize_rows: {x.shape[1]} columns are not whole 32-element blocks")
    cdef Py_ssize_t n = x.shape[0], cols = x.shape[1], i
    cdef int nb = <int>(cols // 32), nbp = (nb + 15) // 16 * 16
    xq_a = np.zeros((n, 32 * nbp), np.int8)
    d_a = np.zeros((n, nbp), np.float32)
    cs_a = np.zeros((n, nbp), np.float32)
    cdef int8_t[:, ::1] xq = xq_a
    cdef float[:, ::1] d = d_a
    cdef float[:, ::1] cs = cs_a
    for i in range(n):
        lg_quantize_row(qtype, &x[i, 0], nb, nbp, &xq[i, 0], &d[i, 0], &cs[i, 0])
    qs = xq_a[:, :cols].reshape(n, nb, 32)
    if qtype != int(_T.Q8_0):   # stored as (element k, element 16 + k) pairs
        qs = np.concatenate([qs[:, :, 0::2], qs[:, :, 1::2]], axis=2)
    return qs.reshape(n, cols), d_a[:, :nb].copy(), cs_a[:, :nb].copy()


def matmul_into(const float[:, ::1] x, const uint8_t[:, ::1] w, int qtype, float[:, ::1] out, int threads):
    """out[n, rows] = x[n, cols] @ W.T, W = rows GGUF rows of `qtype` blocks in w (uint8[rows, row_bytes]).

    Quantized types multiply int8-quantized activations (Q8_0 / Q8_1, as llama.cpp); float
    types multiply in float32. Raises ValueError for an unsupported type or mismatched shapes.
    """
    if qtype not in _BLOCKS:
        names = ", ".join(sorted(_T(t).name for t in _BLOCKS))
        try:
            name = _T(qtype).name
        except ValueError:
            name = str(qtype)
        raise ValueError(f"matmul_into: type {name} is not supported by weightstream.kernels._legacy (supported: {names})")
    if threads < 1:
        raise ValueError(f"matmul_into: threads must be >= 1, got {threads}")
    elements, nbytes = _BLOCKS[qtype]
    cdef Py_ssize_t n = x.shape[0], rows = w.shape[0], rb = w.shape[1]
    if rb % nbytes:
        raise ValueError(f"matmul_into: {_T(qtype).name} rows of {rb} bytes are not whole {nbytes}-byte blocks")
    cdef Py_ssize_t cols = rb // nbytes * elements
    if x.shape[1] != cols:
        raise ValueError(f"matmul_into: x has {x.shape[1]} columns, {_T(qtype).name} weight rows have {cols}")
    if out.shape[0] != n or out.shape[1] != rows:
        raise ValueError(f"matmul_into: out has shape ({out.shape[0]}, {out.shape[1]}), expected ({n}, {rows})")
    if cols >= 2**31 or rows >= 2**31 or n >= 2**31:
        raise ValueError("matmul_into: dimensions must be < 2**31")
    if n == 0 or rows == 0:
        return
    if cols == 0:
        out[:, :] = 0
        return

    cdef lg_ctx c
    cdef Py_ssize_t i, chunk, nchunks, crow
    cdef int tid, nthreads = threads
    cdef bint quant = elements == 32
    c.t = qtype
    c.n = <int>n
    c.rows = <int>rows
    c.cols = <int>cols
    c.nb = <int>(cols // 32) if quant else 0
    c.nbp = (c.nb + 15) // 16 * 16
    c.fused = n <= FUSED_MAX_N
    c.w = &w[0, 0]
    c.w_stride = <size_t>rb
    c.x = &x[0, 0]
    c.x_stride = <size_t>cols
    c.out = &out[0, 0]
    c.o_stride = <size_t>rows
    c.xs = 32 * <size_t>c.nbp
    c.fs = <size_t>c.nbp
    c.scratch = NULL
    c.scratch_bytes = 0
    c.xq = NULL
    c.dx = NULL
    c.cs = NULL
    c.wb = 16

    cdef int8_t *xq = NULL
    cdef float *fbuf = NULL
    cdef uint8_t *scratch = NULL
    try:
        if quant:
            xq = <int8_t *>lg_alloc(<size_t>n * c.xs)
            fbuf = <float *>lg_alloc(2 * <size_t>n * c.fs * sizeof(float))
            if xq == NULL or fbuf == NULL:
                raise MemoryError()
            c.xq = xq
            c.dx = fbuf
            c.cs = fbuf + <size_t>n * c.fs
            for i in prange(n, nogil=True, num_threads=nthreads if n > 1 else 1, schedule="static"):
                lg_quantize_row(c.t, &x[i, 0], c.nb, c.nbp, xq + <size_t>i * c.xs,
                                fbuf + <size_t>i * c.fs, fbuf + (<size_t>n + i) * c.fs)
            if AMX and n >= _AMX_MIN_N:
                scratch = <uint8_t *>lg_alloc(<size_t>((n + 15) // 16 + nthreads) * c.nb * LG_AMX_BLK)
                if scratch == NULL:
                    raise MemoryError()
                with nogil:
                    _matmul_amx(&c, scratch + <size_t>nthreads * c.nb * LG_AMX_BLK, scratch, nthreads)
                return
            if not c.fused:
                c.wb = max(1, min(64, _SCRATCH_TARGET // (c.xs + 8 * c.fs)))
                c.scratch_bytes = <size_t>c.wb * (c.xs + 8 * c.fs)
                scratch = <uint8_t *>lg_alloc(c.scratch_bytes * nthreads)
                if scratch == NULL:
                    raise MemoryError()
                c.scratch = scratch
        crow = c.wb
        nchunks = (rows + crow - 1) // crow
        with nogil:
            for chunk in prange(nchunks, num_threads=nthreads, schedule="static"):
                tid = threadid()
                lg_chunk(&c, <int>(chunk * crow), <int>((chunk + 1) * crow), tid)
    finally:
        free(xq)
        free(fbuf)
        free(scratch)
