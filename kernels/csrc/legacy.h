/* The legacy 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float types (F32, F16,
 * BF16) for kernels/_legacy.pyx: activation quantization (Q8_0 / Q8_1), weight unpacking, and the
 * per-chunk matmul (decode: unpack while multiplying; prefill: unpack a chunk of rows into an L2
 * scratch, then tiles of activation rows), in AVX-512 (LG_SIMD), AVX2 (LG_AVX2) or scalar C as
 * the build targets. _legacy.pyx's docstring describes the method; legacy_amx.h adds the AMX
 * prefill path on top of these helpers.
 */
#ifndef WS_LEGACY_H
#define WS_LEGACY_H

#include "common.h"
#include "sum16.h"
#include "fdot.h"
#include <stddef.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__) && defined(__BMI2__)
#define LG_SIMD 1
#define LG_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LG_SIMD 0
#define LG_AVX2 1   /* 256-bit kernels for CPUs without AVX-512 (Zen 3, Haswell .. Alder Lake) */
#include <immintrin.h>
#else
#define LG_SIMD 0
#define LG_AVX2 0
#endif

static int lg_simd(void) { return LG_SIMD; }
static int lg_avx2(void) { return LG_AVX2; }
/* Bytes ahead of the weights being read that each thread prefetches: one core's hardware
   prefetcher alone keeps too few lines in flight to stream at the memory's rate (the same
   measurement as WS_KQ_PREFETCH in kquants_simd.h). Rows of a chunk are contiguous. */
#ifndef LG_PREFETCH
#define LG_PREFETCH 4096
#endif

/* offset of the quants and of qh inside a block */
WS_INLINE int lg_qs_off(int t) {
    switch (t) { case WS_Q4_0: return 2; case WS_Q4_1: return 4; case WS_Q5_0: return 6; case WS_Q5_1: return 8; default: return 2; }
}
WS_INLINE int lg_qh_off(int t) { return t == WS_Q5_0 ? 2 : 4; }
/* Q4_1 / Q5_1 carry a min (use Q8_1's s); the others an offset folded via sum(q) */
WS_INLINE int lg_has_min(int t) { return t == WS_Q4_1 || t == WS_Q5_1; }
WS_INLINE int lg_offset(int t) { return t == WS_Q4_0 ? 8 : t == WS_Q5_0 ? 16 : t == WS_Q8_0 ? 128 : 0; }
/* Byte orders of a row of activation quants, the same as its unpacked weights' (prefill) */
enum {
    LG_NATURAL = 0,   /* element order */
    LG_INTER = 1,     /* each block's as (element k, element 16 + k) pairs: AVX-512's widening unpack */
    LG_SPLIT = 2,     /* each pair of blocks A, B: A's elements 0..15, B's 0..15, A's 16..31, B's 16..31:
                         AVX2's unpack of both blocks' nibbles in one register (lg_unpack_w) */
};
/* the order the prefill unpack of type t gives (Q8_0's bytes are never reordered) */
WS_INLINE int lg_order(int t) { return t == WS_Q8_0 ? LG_NATURAL : LG_SIMD ? LG_INTER : LG_AVX2 ? LG_SPLIT : LG_NATURAL; }
/* the order the decode stream (lg_stream_rows) reads: AVX-512 unpacks pairs into element order
   (lg_unpack_pair_nat), AVX2 as its prefill does */
WS_INLINE int lg_stream_order(int t) { return LG_SIMD ? LG_NATURAL : lg_order(t); }
/* where half h (elements 16 h .. 16 h + 15) of block b's quants lie in a row of the given order */
WS_INLINE size_t lg_half_at(int order, int b, int h) {
    return order == LG_SPLIT ? 64 * (size_t)(b >> 1) + 16 * (size_t)(b & 1) + 32 * (size_t)h : 32 * (size_t)b + 16 * (size_t)h;
}

/* binary32 -> binary16 -> binary32, round to nearest even (NumPy's astype(float16)) */
static inline float lg_round_f16(float f) {
#if LG_SIMD || LG_AVX2
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#else
    ws_f32 x; x.f = f;
    uint32_t sign = x.u & 0x80000000u, ax = x.u & 0x7FFFFFFFu;
    ws_f32 r;
    if (ax >= 0x7F800000u) return f;                          /* inf / nan */
    if (ax >= 0x477FF000u) { r.u = sign | 0x7F800000u; return r.f; }   /* rounds to inf */
    if (ax < 0x38800000u) {                                  /* half subnormal: units of 2^-24 */
        ws_f32 a; a.u = ax;
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
   order: the byte order (LG_NATURAL, LG_INTER, LG_SPLIT): lg_order(t) for the prefill and AMX
   unpacks and the AVX2 decode, LG_NATURAL for the AVX-512 decode stream (lg_unpack_pair_nat).
   Returns nonzero when the row holds a NaN or an Inf (lost in the int8 quants).
   ---------------------------------------------------------------------------------- */
static int lg_quantize_row(int t, const float *x, int nb, int nbp, int8_t *xq, float *dx, float *cs,
                           int order) {
    const int has_min = lg_has_min(t), off = lg_offset(t);
    /* sum of v - v over the row: +0 while every value is finite, NaN once one is NaN or Inf
       (the row's outputs become NaN: ws_nan_rows). Kept as written: no -ffast-math here. */
#if LG_SIMD
    __m512 nfv = _mm512_setzero_ps();
#elif LG_AVX2
    __m256 nfv = _mm256_setzero_ps();
#else
    float nf = 0.0f;
#endif
    for (int b = 0; b < nb; b++) {
        const float *v = x + 32 * (size_t)b;
        int8_t *q0 = xq + lg_half_at(order, b, 0), *q1 = xq + lg_half_at(order, b, 1);
        float d, id;
        int isum = 0;
#if LG_SIMD
        __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
        nfv = _mm512_add_ps(nfv, _mm512_add_ps(_mm512_sub_ps(a0, a0), _mm512_sub_ps(a1, a1)));
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
        if (order == LG_INTER) { __m128i t0 = _mm_unpacklo_epi8(b0, b1), t1 = _mm_unpackhi_epi8(b0, b1); b0 = t0; b1 = t1; }
        _mm_storeu_si128((__m128i *)q0, b0);
        _mm_storeu_si128((__m128i *)q1, b1);
#elif LG_AVX2
        const __m256 signbit = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
        __m256 a[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            a[i] = _mm256_loadu_ps(v + 8 * i);
            nfv = _mm256_add_ps(nfv, _mm256_sub_ps(a[i], a[i]));
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(signbit, a[i]));
        }
        float amax = ws_hmax8(mx);
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i iv[4];
        for (int i = 0; i < 4; i++) {   /* sign(s) * floor(|s| + 0.5f), in float32 as NumPy does */
            const __m256 si = _mm256_mul_ps(a[i], vid);
            const __m256 ri = _mm256_round_ps(_mm256_add_ps(_mm256_andnot_ps(signbit, si), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            iv[i] = _mm256_cvttps_epi32(_mm256_or_ps(ri, _mm256_and_ps(si, signbit)));
        }
        __m256i is = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
        __m128i is4 = _mm_add_epi32(_mm256_castsi256_si128(is), _mm256_extracti128_si256(is, 1));
        is4 = _mm_add_epi32(is4, _mm_shuffle_epi32(is4, 0x4E));
        isum = _mm_cvtsi128_si32(_mm_add_epi32(is4, _mm_shuffle_epi32(is4, 0xB1)));
        /* the packs work inside 128-bit lanes: 4-element groups come out in the order
           0, 2, 4, 6 | 1, 3, 5, 7; the permute puts them back */
        __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        __m128i b0 = _mm256_castsi256_si128(q8), b1 = _mm256_extracti128_si256(q8, 1);
        if (order == LG_INTER) { __m128i t0 = _mm_unpacklo_epi8(b0, b1), t1 = _mm_unpackhi_epi8(b0, b1); b0 = t0; b1 = t1; }
        _mm_storeu_si128((__m128i *)q0, b0);
        _mm_storeu_si128((__m128i *)q1, b1);
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) { float a = fabsf(v[j]); if (a > amax) amax = a; nf += v[j] - v[j]; }
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        int8_t tmp[32], o[32];
        for (int j = 0; j < 32; j++) {
            volatile float s = v[j] * id;          /* no contraction into the add below */
            float a = floorf(fabsf(s) + 0.5f);
            int qi = (int)a;
            tmp[j] = (int8_t)(s < 0.0f ? -qi : qi);
            isum += tmp[j];
        }
        for (int j = 0; j < 16; j++) {
            if (order == LG_INTER) { o[2 * j] = tmp[j]; o[2 * j + 1] = tmp[16 + j]; }
            else { o[j] = tmp[j]; o[16 + j] = tmp[16 + j]; }
        }
        memcpy(q0, o, 16);
        memcpy(q1, o + 16, 16);
#endif
        float dr = lg_round_f16(d);
        dx[b] = dr;
        if (has_min) cs[b] = lg_round_f16(d * (float)isum);
        else cs[b] = dr * (float)(-off * isum);
    }
    for (int b = nb; b < nbp; b++) {
        memset(xq + lg_half_at(order, b, 0), 0, 16);
        memset(xq + lg_half_at(order, b, 1), 0, 16);
        dx[b] = 0.0f; cs[b] = 0.0f;
    }
#if LG_SIMD
    return _mm512_cmp_ps_mask(nfv, nfv, _CMP_UNORD_Q) != 0;
#elif LG_AVX2
    return _mm256_movemask_ps(_mm256_cmp_ps(nfv, nfv, _CMP_UNORD_Q)) != 0;
#else
    return nf != nf;
#endif
}

/* ---------------------------------------------------------------------------------
   Weights -> unsigned bytes in the activations' order, 64 per pair of blocks.
   ---------------------------------------------------------------------------------- */
#if LG_SIMD
/* the pair of blocks at p (two = 0: only the first exists; the second reads as zeros) */
WS_INLINE __m512i lg_unpack_pair(const int t, const uint8_t *p, int two) {
    const int bs = ws_block_bytes(t);
    if (t == WS_Q8_0) {
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
    if (t == WS_Q5_0 || t == WS_Q5_1) {
        const int ho = lg_qh_off(t);
        uint32_t h0 = ws_load_u32(p + ho), h1 = two ? ws_load_u32(p + bs + ho) : 0u;
        uint64_t m0 = _pdep_u32(h0 & 0xFFFFu, 0x55555555u) | _pdep_u32(h0 >> 16, 0xAAAAAAAAu);
        uint64_t m1 = _pdep_u32(h1 & 0xFFFFu, 0x55555555u) | _pdep_u32(h1 >> 16, 0xAAAAAAAAu);
        v = _mm512_mask_add_epi8(v, (__mmask64)(m0 | (m1 << 32)), v, _mm512_set1_epi8(16));
    }
    return v;
}
/* fp16 d (and m) of up to 16 blocks from p: one 32-bit gather of each block's first bytes */
WS_INLINE void lg_scales16(const int t, const uint8_t *p, int k, __m512 *dw, __m512 *cw) {
    const int bs = ws_block_bytes(t);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bs));
    __mmask16 km = k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << k) - 1u);
    __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, idx, (const void *)p, 1);
    __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    *dw = _mm512_add_ps(_mm512_sub_ps(d, d), d);                 /* Inf -> NaN: ws_inf_to_nan */
    if (lg_has_min(t)) {
        __m512 m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
        *cw = _mm512_add_ps(_mm512_sub_ps(m, m), m);
    }
    else *cw = *dw;
}
#elif LG_AVX2
/* byte j of each 128-bit lane = 16 where bit (j + 16 half) of that lane's 32-bit word in hv is
   set, else 0 (the fifth bits of Q5: hv holds block A's qh in the low lane, B's in the high) */
WS_INLINE __m256i lg_bits16(__m256i hv, int half) {
    const __m256i ctl = half ? _mm256_set1_epi64x(0x0202020202020202ll) : _mm256_setzero_si256();
    const __m256i b = _mm256_shuffle_epi8(hv, _mm256_add_epi8(ctl, _mm256_set_epi64x(0x0101010101010101ll, 0, 0x0101010101010101ll, 0)));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);   /* byte j: bit j % 8 */
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit), _mm256_set1_epi8(16));
}
/* The weights at p as lg_dot32 takes them. Q8_0, one block: w0 its signed quants, w1 their
   magnitudes. The nibble types, the pair of blocks A at p and B after it (two = 0: B reads as
   zeros), unsigned, in LG_SPLIT order: one register holds both blocks' 16 qs bytes, its low
   nibbles (w0) are elements 0..15 of A then of B, its high nibbles (w1) elements 16..31. */
WS_INLINE void lg_unpack_w(const int t, const uint8_t *p, int two, __m256i *w0, __m256i *w1) {
    if (t == WS_Q8_0) {
        *w0 = _mm256_loadu_si256((const __m256i *)(p + 2));
        *w1 = _mm256_abs_epi8(*w0);
        return;
    }
    const int bs = ws_block_bytes(t), qo = lg_qs_off(t);
    /* both blocks' qs: two 32-byte loads (from A's qs; the 32 bytes that end with B's qs: both
       inside the pair's blocks for every type) and a blend, where vinserti128 would take Zen 3's
       one lane-crossing shuffle pipe (llvm-mca, znver3: 8 blocks of Q4_1 23 -> 19 cycles) */
    const __m256i v = two ? _mm256_blend_epi32(_mm256_loadu_si256((const __m256i *)(p + qo)),
                                               _mm256_loadu_si256((const __m256i *)(p + bs + qo - 16)), 0xF0)
                          : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(p + qo)));
    const __m256i lo = _mm256_set1_epi8(0x0F);
    *w0 = _mm256_and_si256(v, lo);
    *w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);
    if (t == WS_Q5_0 || t == WS_Q5_1) {   /* bit j of qh: element j's fifth bit */
        const int ho = lg_qh_off(t);
        /* A's qh broadcast in the low lane, B's in the high: two broadcast loads (load ports
           only) and a blend, where combining the halves in integer registers and a vmovd +
           vpbroadcastd per register cost ~20% of a Q5_0 pair (1 thread, 4096x4096) */
        const __m256i ha = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(p + ho)));
        const __m256i hv = two ? _mm256_blend_epi32(ha, _mm256_castps_si256(_mm256_broadcast_ss((const float *)(p + bs + ho))), 0xF0)
                               : _mm256_blend_epi32(ha, _mm256_setzero_si256(), 0xF0);
        *w0 = _mm256_or_si256(*w0, lg_bits16(hv, 0));
        *w1 = _mm256_or_si256(*w1, lg_bits16(hv, 1));
    }
}
/* blocks per lg_unpack_w */
WS_INLINE int lg_step(int t) { return t == WS_Q8_0 ? 1 : 2; }
/* fp16 d (and m) of up to 8 blocks from p (k of them exist): each block's first 4 bytes (a
   gather where fewer than 8 exist), Inf made NaN (ws_inf_to_nan) */
WS_INLINE void lg_scales8(const int t, const uint8_t *p, int k, __m256 *dw, __m256 *cw) {
    const int bs = ws_block_bytes(t);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    if (k >= 8) {   /* 8 loads and a tree of unpacks (on Zen 3 faster than the gather), in
                       128-bit registers: no lane-crossing shuffles (Zen 3 has one pipe for them) */
        __m128i v[8];
        for (int i = 0; i < 8; i++)
            v[i] = _mm_loadu_si32(p + (size_t)i * bs);
        const __m128i sp = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        const __m128i lo = _mm_shuffle_epi8(_mm_unpacklo_epi64(_mm_unpacklo_epi32(v[0], v[1]), _mm_unpacklo_epi32(v[2], v[3])), sp);
        const __m128i hi = _mm_shuffle_epi8(_mm_unpacklo_epi64(_mm_unpacklo_epi32(v[4], v[5]), _mm_unpacklo_epi32(v[6], v[7])), sp);
        const __m256 d = _mm256_cvtph_ps(_mm_unpacklo_epi64(lo, hi));   /* the 8 d */
        *dw = _mm256_add_ps(_mm256_sub_ps(d, d), d);
        if (lg_has_min(t)) {
            const __m256 m = _mm256_cvtph_ps(_mm_unpackhi_epi64(lo, hi));
            *cw = _mm256_add_ps(_mm256_sub_ps(m, m), m);
        }
        else *cw = *dw;
        return;
    }
    __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)p, _mm256_mullo_epi32(lane, _mm256_set1_epi32(bs)),
                                            _mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane), 1);
    /* the 8 d into the low 128 bits, the 8 m into the high */
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    g = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g, split), 0xD8);
    const __m256 d = _mm256_cvtph_ps(_mm256_castsi256_si128(g));
    *dw = _mm256_add_ps(_mm256_sub_ps(d, d), d);
    if (lg_has_min(t)) {
        const __m256 m = _mm256_cvtph_ps(_mm256_extracti128_si256(g, 1));
        *cw = _mm256_add_ps(_mm256_sub_ps(m, m), m);
    }
    else *cw = *dw;
}
#endif

/* one weight row -> ubuf u8[nbp * 32], dwb[nbp], cwb[nbp] (zero padded) */
static void lg_unpack_row(int t, const uint8_t *w, int nb, int nbp, uint8_t *ubuf, float *dwb, float *cwb) {
    const int bs = ws_block_bytes(t);
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
#elif LG_AVX2
    const int step = lg_step(t);
    int b = 0;
    for (; b < nb; b += step) {   /* Q8_0: the signed quants; else pairs of blocks in LG_SPLIT order */
        __m256i w0, w1;
        lg_unpack_w(t, w + (size_t)b * bs, b + 1 < nb, &w0, &w1);
        _mm256_storeu_si256((__m256i *)(ubuf + 32 * (size_t)b), w0);
        if (step == 2) _mm256_storeu_si256((__m256i *)(ubuf + 32 * (size_t)b + 32), w1);
    }
    memset(ubuf + 32 * (size_t)b, 0, 32 * (size_t)(nbp - b));
    for (int g = 0; g < nbp; g += 8) {
        __m256 dw = _mm256_setzero_ps(), cw = dw;
        if (g < nb) lg_scales8(t, w + (size_t)g * bs, nb - g, &dw, &cw);
        _mm256_storeu_ps(dwb + g, dw); _mm256_storeu_ps(cwb + g, cw);
    }
#else
    const int qo = lg_qs_off(t);
    memset(ubuf, 0, 32 * (size_t)nbp);
    for (int b = 0; b < nbp; b++) { dwb[b] = 0.0f; cwb[b] = 0.0f; }
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = w + (size_t)b * bs;
        uint8_t *e = ubuf + 32 * (size_t)b;   /* element order */
        if (t == WS_Q8_0) { for (int j = 0; j < 32; j++) e[j] = (uint8_t)(p[2 + j] ^ 0x80u); }
        else {
            for (int j = 0; j < 16; j++) { e[j] = p[qo + j] & 15u; e[16 + j] = p[qo + j] >> 4; }
            if (t == WS_Q5_0 || t == WS_Q5_1) {
                uint32_t h = ws_load_u32(p + lg_qh_off(t));
                for (int j = 0; j < 32; j++) e[j] |= (uint8_t)(((h >> j) & 1u) << 4);
            }
        }
        dwb[b] = ws_inf_to_nan(ws_half_at(p));     /* Inf -> NaN, as the reference's 0 * Inf */
        cwb[b] = lg_has_min(t) ? ws_inf_to_nan(ws_half_at(p + 2)) : dwb[b];
    }
#endif
}

/* ---------------------------------------------------------------------------------
   Dot products of one weight row with R activation rows.
   fused: read blocks from wrow directly; else from the unpacked ubuf / dwb / cwb.
   xq / dx / cs: activation row 0, next rows xs bytes / fs floats further.
   out[r * os] = result for activation row r.
   ---------------------------------------------------------------------------------- */
#if LG_SIMD
WS_INLINE void lg_dot_tile(const int t, const int fused, const int R,
                           const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb,
                           int nb, const int8_t *xq, const float *dx, const float *cs,
                           size_t xs, size_t fs, float *out, size_t os, int accum) {
    const int bs = ws_block_bytes(t);
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
        #define LG_PAIR(J, A) do { \
                const int blk = g + 2 * (J); \
                __m512i wv = fused ? lg_unpack_pair(t, wrow + (size_t)blk * bs, blk + 1 < nb) \
                                   : _mm512_loadu_si512((const void *)(ubuf + 32 * (size_t)blk)); \
                __m512i ix = _mm512_add_epi32(base, _mm512_set1_epi32(2 * (J))); \
                for (int r = 0; r < R; r++) { \
                    __m512i d = _mm512_dpbusd_epi32(zero, wv, _mm512_loadu_si512((const void *)(xq + r * xs + 32 * (size_t)blk))); \
                    acc[r][A] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(ix, S[r]), acc[r][A]); \
                } \
            } while (0)
        for (; j + 2 <= np; j += 2) { LG_PAIR(j, 0); LG_PAIR(j + 1, 1); }
        if (j < np) LG_PAIR(j, 0);
        #undef LG_PAIR
    }
    for (int r = 0; r < R; r++)
        out[r * os] = (accum ? out[r * os] : 0.0f) + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), acc2[r]));
}
#elif LG_AVX2
/* int32 lanes of the dot of lg_unpack_w's w0, w1 with the activation quants at x (same order).
   Q8_0: one block, lanes summing to its dot; |w| times x with w's sign (unsigned q + 128 would
   saturate maddubs' int16 at 2 * 255 * 127), so no offset term. Nibble types: lanes 0..3 sum to
   block A's dot, 4..7 to B's; unsigned weights, the two halves' int16 sums added before widening
   (at most 2 * 2 * 31 * 127 = 15748: no saturation). */
WS_INLINE __m256i lg_dot32(const int t, __m256i w0, __m256i w1, const int8_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)x);
    if (t == WS_Q8_0)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w1, _mm256_sign_epi8(x0, w0)), ones);
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1)), ones);
}
/* Blocks 8 at a time: their scales as one vector (dw * dx), the min / offset terms one FMA per
   activation row; per block (Q8_0) or pair of blocks one int8 dot per row, scaled by its lanes
   of dw * dx. */
WS_INLINE void lg_dot_tile(const int t, const int fused, const int R,
                           const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb,
                           int nb, const int8_t *xq, const float *dx, const float *cs,
                           size_t xs, size_t fs, float *out, size_t os, int accum) {
    const int bs = ws_block_bytes(t);
    __m256 acc[4][2], acc2[4];
    for (int r = 0; r < R; r++) { acc[r][0] = acc[r][1] = acc2[r] = _mm256_setzero_ps(); }
    for (int g = 0; g < nb; g += 8) {
        const int k = nb - g < 8 ? nb - g : 8;
        __m256 dw, cw, S[4];
        if (fused) {  /* prefetch: see LG_PREFETCH */
            for (int o = 0; o < 8 * bs; o += 64)
                _mm_prefetch((const char *)wrow + (size_t)g * bs + LG_PREFETCH + o, _MM_HINT_T0);
            lg_scales8(t, wrow + (size_t)g * bs, k, &dw, &cw);
        }
        else { dw = _mm256_loadu_ps(dwb + g); cw = _mm256_loadu_ps(cwb + g); }
        for (int r = 0; r < R; r++) {
            S[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(dx + r * fs + g));
            if (t != WS_Q8_0)
                acc2[r] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(cs + r * fs + g), acc2[r]);
        }
        /* unrolled: the scale lanes and accumulator are constants (acc stays in registers) */
        const int step = lg_step(t);
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j += step) {
            if (j >= k)
                break;
            const int blk = g + j, a = (j / step) & 1;
            __m256i w0, w1;
            if (fused) lg_unpack_w(t, wrow + (size_t)blk * bs, blk + 1 < nb, &w0, &w1);
            else {
                w0 = _mm256_loadu_si256((const __m256i *)(ubuf + 32 * (size_t)blk));
                w1 = step == 2 ? _mm256_loadu_si256((const __m256i *)(ubuf + 32 * (size_t)blk + 32)) : _mm256_abs_epi8(w0);
            }
            const __m256i ix = step == 2 ? _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1) : _mm256_set1_epi32(j);
            for (int r = 0; r < R; r++) {
                const __m256i d = lg_dot32(t, w0, w1, xq + r * xs + 32 * (size_t)blk);
                acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(S[r], ix), acc[r][a]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        out[r * os] = (accum ? out[r * os] : 0.0f) + ws_hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), acc2[r]));
}
#else
WS_INLINE void lg_dot_tile(const int t, const int fused, const int R,
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
   Dispatch: constant (type, fused, R) instantiations of the inline kernels.
   ---------------------------------------------------------------------------------- */
#define LG_DOT_ARGS wrow, ubuf, dwb, cwb, nb, xq, dx, cs, xs, fs, out, os, accum
#define LG_DOT_R(T, F) switch (R) { case 1: lg_dot_tile(T, F, 1, LG_DOT_ARGS); break; case 2: lg_dot_tile(T, F, 2, LG_DOT_ARGS); break; case 3: lg_dot_tile(T, F, 3, LG_DOT_ARGS); break; default: lg_dot_tile(T, F, 4, LG_DOT_ARGS); break; }
#define LG_DOT_FN(NAME, T) static void NAME(int fused, int R, const uint8_t *wrow, const uint8_t *ubuf, const float *dwb, const float *cwb, int nb, const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs, float *out, size_t os, int accum) { if (fused) { LG_DOT_R(T, 1) } else { LG_DOT_R(T, 0) } }
LG_DOT_FN(lg_dot_q4_0, WS_Q4_0)
LG_DOT_FN(lg_dot_q4_1, WS_Q4_1)
LG_DOT_FN(lg_dot_q5_0, WS_Q5_0)
LG_DOT_FN(lg_dot_q5_1, WS_Q5_1)
LG_DOT_FN(lg_dot_q8_0, WS_Q8_0)

typedef void (*lg_dot_fn)(int, int, const uint8_t *, const uint8_t *, const float *, const float *, int,
                          const int8_t *, const float *, const float *, size_t, size_t, float *, size_t, int);
static lg_dot_fn lg_dot_for(int t) {
    switch (t) {
    case WS_Q4_0: return lg_dot_q4_0; case WS_Q4_1: return lg_dot_q4_1; case WS_Q5_0: return lg_dot_q5_0;
    case WS_Q5_1: return lg_dot_q5_1; default: return lg_dot_q8_0;
    }
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
    /* decode stream (lg_stream_rows): activations in lg_stream_order, their dx / cs tiled along
       a chunk's blocks (dxr[r * rs + i] = dx[r][i % nb], the same for cs: rs >= wb * nb + 16), and
       per thread rs * n + 256 * n floats of scratch (fscratch, fscratch_floats apart) */
    int stream;
    const float *dxr; const float *csr; size_t rs;
    float *fscratch; size_t fscratch_floats;
} lg_ctx;

#if LG_SIMD
/* Decode, an even number of blocks per row: unpack a pair of blocks into natural order (byte i
   of the 64 = element i of the pair's 64), the activations' lg_quantize_row(LG_NATURAL) order.
   The nibbles need no byte moves: each block's 16 qs bytes are broadcast to two 128-bit lanes
   (a load and a masked broadcast), and one GF(2) affine byte map per 64-bit lane keeps the low
   nibble (lanes 0, 2) or moves the high nibble down (lanes 1, 3): 2 vector uops where
   lg_unpack_pair's interleaved order takes 4 (widen to words, shift, merge, insert). */
#define LG_NIB_LO 0x0102040800000000ll   /* output bit i <- input bit i (i < 4) */
#define LG_NIB_HI 0x1020408000000000ll   /* output bit i <- input bit i + 4 */
WS_INLINE __m512i lg_unpack_pair_nat(const int t, const uint8_t *p) {
    const int bs = ws_block_bytes(t);
    if (t == WS_Q8_0)   /* not interleaved: lg_unpack_pair's bytes are already in natural order */
        return lg_unpack_pair(t, p, 1);
    const int qo = lg_qs_off(t);
    __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + qo)));
    x = _mm512_mask_broadcast_i32x4(x, (__mmask16)0xFF00, _mm_loadu_si128((const __m128i *)(p + bs + qo)));
#if defined(__GFNI__)
    __m512i v = _mm512_gf2p8affine_epi64_epi8(x, _mm512_set_epi64(LG_NIB_HI, LG_NIB_HI, LG_NIB_LO, LG_NIB_LO,
                                                                   LG_NIB_HI, LG_NIB_HI, LG_NIB_LO, LG_NIB_LO), 0);
#else
    __m512i v = _mm512_and_si512(_mm512_srlv_epi16(x, _mm512_set_epi64(0x0004000400040004ll, 0x0004000400040004ll, 0, 0,
                                                                       0x0004000400040004ll, 0x0004000400040004ll, 0, 0)),
                                 _mm512_set1_epi8(0x0F));
#endif
    if (t == WS_Q5_0 || t == WS_Q5_1) {   /* bit j of qh: element j's fifth bit */
        const int ho = lg_qh_off(t);
        const uint64_t hm = (uint64_t)ws_load_u32(p + ho) | ((uint64_t)ws_load_u32(p + bs + ho) << 32);
        v = _mm512_mask_add_epi8(v, (__mmask64)hm, v, _mm512_set1_epi8(16));
    }
    return v;
}

/* Decode (n = R <= 4 activation rows, nb even): weight rows [r0, r1) (<= 16, contiguous) read as one
   stream of blocks, 16 at a time: one gather of the 16 blocks' d (and m) wherever the rows
   begin and end, instead of one per 16 blocks of each row (a 576-wide row has 18 blocks: two
   gathers and conversions for 18 blocks), times the activations' dx tiled along the stream
   (c->dxr); the per-block min / offset terms go to scratch and are added once a row is done.
   Each pair of blocks: unpack (2 uops), then per activation row dpbusd, convert and one FMA
   with the pair's scales. A row's 16 lanes go to scratch; one sum16 tree sums the rows at the
   end (no horizontal sum per row). Deterministic: the same order whatever the threads. */
WS_INLINE void lg_stream_rows(const int t, const int R, const lg_ctx *c, int r0, int r1, float *scr) {
    const int bs = ws_block_bytes(t), nb = c->nb;
    const int nrows = r1 - r0, nblk = nrows * nb;
    const size_t rs = c->rs;
    float *mt = scr;              /* [R][rs]: the min / offset term of each block of the stream */
    float *part = scr + R * rs;   /* [16 rows][R][16]: each row's lanes */
    const uint8_t *w = c->w + (size_t)r0 * c->w_stride;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int row = 0, jb = 0;          /* the row being summed and its next block */
    for (int g = 0; g < nblk; g += 16) {
        const int k = nblk - g < 16 ? nblk - g : 16;   /* even: nb is */
        const uint8_t *gw = w + (size_t)g * bs;
        for (int o = 0; o < 16 * bs; o += 64)   /* see LG_PREFETCH */
            _mm_prefetch((const char *)gw + LG_PREFETCH + o, _MM_HINT_T0);
        __m512 dw, cw, S[4];
        lg_scales16(t, gw, k, &dw, &cw);
        for (int r = 0; r < R; r++) {
            S[r] = _mm512_mul_ps(dw, _mm512_loadu_ps(c->dxr + r * rs + g));
            _mm512_storeu_ps(mt + r * rs + g, _mm512_mul_ps(cw, _mm512_loadu_ps(c->csr + r * rs + g)));
        }
        /* unrolled: the pair's scale index and accumulator are constants (acc stays in registers) */
        #pragma GCC unroll 8
        for (int p = 0; p < 8; p++) {
            if (2 * p >= k)
                break;
            const __m512i wv = lg_unpack_pair_nat(t, gw + (size_t)(2 * p) * bs);
            const __m512i ix = _mm512_add_epi32(base, _mm512_set1_epi32(2 * p));
            for (int r = 0; r < R; r++) {
                const __m512i d = _mm512_dpbusd_epi32(zero, wv, _mm512_loadu_si512((const void *)(c->xq + r * c->xs + 32 * (size_t)jb)));
                acc[r][p & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(ix, S[r]), acc[r][p & 1]);
            }
            jb += 2;
            if (jb == nb) {   /* row done: its min / offset terms, then its lanes to scratch */
                for (int r = 0; r < R; r++) {
                    __m512 v = _mm512_add_ps(acc[r][0], acc[r][1]);
                    const float *m = mt + r * rs + (size_t)row * nb;
                    for (int b = 0; b < nb; b += 16) {
                        const int left = nb - b;
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u), m + b));
                    }
                    _mm512_storeu_ps(part + (size_t)(row * R + r) * 16, v);
                    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
                }
                row++;
                jb = 0;
            }
        }
    }
    for (int r = 0; r < R; r++)
        ws_sum16_rows(part + 16 * r, 16 * R, nrows, c->out + (size_t)r * c->o_stride + r0);
}

#elif LG_AVX2
/* Decode (n = R <= 4 activation rows, nb even), AVX2: weight rows [r0, r1) (<= 16, contiguous)
   read as one stream of blocks, 8 at a time, as the AVX-512 lg_stream_rows: the 8 blocks' d
   (and m) as one vector (lg_scales8) wherever rows begin and end (a 576-wide row has 18 blocks:
   row by row, three scale loads, the last for 2 blocks, and a horizontal sum per row on the
   critical path), times the tiled dx; the min / offset terms to scratch, added when a row is done; a row's 8 lanes to
   scratch, summed after the stream. Activations in lg_order (LG_SPLIT pairs never straddle a row:
   rows start at even blocks). The same order whatever the threads.
   A pair's two scales come from S = d * dx in LG_SCALE_ORDER (even blocks in the low 128 bits,
   odd in the high; dxr tiled so by lg_tile_scales): lane j / 2 of each half by one in-lane
   vpermilps, where natural order took a lane-crossing vpermps per pair and row (Zen 3 has one
   pipe for those): 1 thread, n = 1, Q4_0 4096x4096 809 -> 682 us, Q4_1 819 -> 729. */
static const int lg_scale_order[8] = {0, 2, 4, 6, 1, 3, 5, 7};   /* LG_SCALE_ORDER */
/* [S_j x 4, S_j+1 x 4] of S in LG_SCALE_ORDER, j even (an immediate: j is a constant once unrolled) */
WS_INLINE __m256 lg_pair_scale(__m256 S, int j) {
    switch (j) {
    case 0: return _mm256_permute_ps(S, 0x00);
    case 2: return _mm256_permute_ps(S, 0x55);
    case 4: return _mm256_permute_ps(S, 0xAA);
    default: return _mm256_permute_ps(S, 0xFF);
    }
}
/* a group's 8 block scales dw in the order its S is kept: LG_SCALE_ORDER for the pair types */
WS_INLINE __m256 lg_group_order(int step, __m256 dw) {
    return step == 2 ? _mm256_permutevar8x32_ps(dw, _mm256_loadu_si256((const __m256i *)lg_scale_order)) : dw;
}
/* the lanes of S that block j's product (step 2: the pair j, j + 1) is scaled by */
WS_INLINE __m256 lg_block_scale(int step, __m256 S, int j) {
    return step == 2 ? lg_pair_scale(S, j) : _mm256_permutevar8x32_ps(S, _mm256_set1_epi32(j));
}
WS_INLINE void lg_stream_rows(const int t, const int R, const lg_ctx *c, int r0, int r1, float *scr) {
    const int bs = ws_block_bytes(t), nb = c->nb, step = lg_step(t);
    const int nrows = r1 - r0, nblk = nrows * nb;
    const size_t rs = c->rs;
    float *mt = scr;              /* [R][rs]: the min / offset term of each block (not Q8_0) */
    float *part = scr + R * rs;   /* [16 rows][R][8]: each row's lanes */
    const uint8_t *w = c->w + (size_t)r0 * c->w_stride;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int row = 0, jb = 0;          /* the row being summed and its next block */
    for (int g = 0; g < nblk; g += 8) {
        const int k = nblk - g < 8 ? nblk - g : 8;
        const uint8_t *gw = w + (size_t)g * bs;
        for (int o = 0; o < 8 * bs; o += 64)   /* see LG_PREFETCH */
            _mm_prefetch((const char *)gw + LG_PREFETCH + o, _MM_HINT_T0);
        __m256 dw, cw, S[4];
        lg_scales8(t, gw, k, &dw, &cw);
        const __m256 ds = lg_group_order(step, dw);
        for (int r = 0; r < R; r++) {
            S[r] = _mm256_mul_ps(ds, _mm256_loadu_ps(c->dxr + r * rs + g));
            if (t != WS_Q8_0)
                _mm256_storeu_ps(mt + r * rs + g, _mm256_mul_ps(cw, _mm256_loadu_ps(c->csr + r * rs + g)));
        }
        /* unrolled: the scale lanes and accumulator are constants (acc stays in registers) */
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j += step) {
            if (j >= k)
                break;
            __m256i w0, w1;
            lg_unpack_w(t, gw + (size_t)j * bs, 1, &w0, &w1);
            const int a = (j / step) & 1;
            for (int r = 0; r < R; r++) {
                const __m256i d = lg_dot32(t, w0, w1, c->xq + r * c->xs + 32 * (size_t)jb);
                const __m256 sc = lg_block_scale(step, S[r], j);
                acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc[r][a]);
            }
            jb += step;
            if (jb == nb) {   /* row done: its min / offset terms, then its lanes to scratch */
                for (int r = 0; r < R; r++) {
                    __m256 v = _mm256_add_ps(acc[r][0], acc[r][1]);
                    if (t != WS_Q8_0) {
                        const float *m = mt + r * rs + (size_t)row * nb;
                        for (int b = 0; b < nb; b += 8)
                            v = _mm256_add_ps(v, _mm256_maskload_ps(m + b, _mm256_cmpgt_epi32(_mm256_set1_epi32(nb - b), lane)));
                    }
                    _mm256_storeu_ps(part + (size_t)(row * R + r) * 8, v);
                    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
                }
                row++;
                jb = 0;
            }
        }
    }
    for (int r = 0; r < R; r++)   /* 8 rows' sums at a time, each in ws_hsum8's order */
        for (int i = 0; i < nrows; i += 8)
            ws_sum8_rows(part + (size_t)(i * R + r) * 8, 8 * R, nrows - i < 8 ? nrows - i : 8,
                         c->out + (size_t)r * c->o_stride + r0 + i);
}

/* lg_stream_rows where each row is whole groups of 8 blocks (nb % 8 == 0: 2048, 4096 columns):
   row by row, no group straddles two rows, so the min / offset terms stay in a register (one
   FMA a group and row) instead of going through scratch, and the pair loop has no row-end
   test; the horizontal sum per row is not on a critical path when rows are this long (Zen 3,
   1 thread, n = 1, 4096x4096: Q4_0 712 -> 602 us, Q4_1 725 -> 626, Q8_0 948 -> 830; Q5_0
   768x2048 120 -> 100). dxr / csr as lg_stream_rows reads them (row 0's copy: groups align
   with the tiling). */
WS_INLINE void lg_rows8(const int t, const int R, const lg_ctx *c, int r0, int r1) {
    const int bs = ws_block_bytes(t), nb = c->nb, step = lg_step(t);
    const size_t rs = c->rs;
    for (int i = r0; i < r1; i++) {
        const uint8_t *wr = c->w + (size_t)i * c->w_stride;
        __m256 acc[4][2], accm[4];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = accm[r] = _mm256_setzero_ps();
        for (int g = 0; g < nb; g += 8) {
            const uint8_t *gw = wr + (size_t)g * bs;
            for (int o = 0; o < 8 * bs; o += 64)   /* see LG_PREFETCH */
                _mm_prefetch((const char *)gw + LG_PREFETCH + o, _MM_HINT_T0);
            __m256 dw, cw, S[4];
            lg_scales8(t, gw, 8, &dw, &cw);
            const __m256 ds = lg_group_order(step, dw);
            for (int r = 0; r < R; r++) {
                S[r] = _mm256_mul_ps(ds, _mm256_loadu_ps(c->dxr + r * rs + g));
                if (t != WS_Q8_0)
                    accm[r] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(c->csr + r * rs + g), accm[r]);
            }
            #pragma GCC unroll 8
            for (int j = 0; j < 8; j += step) {
                __m256i w0, w1;
                lg_unpack_w(t, gw + (size_t)j * bs, 1, &w0, &w1);
                const int a = (j / step) & 1;
                for (int r = 0; r < R; r++) {
                    const __m256i d = lg_dot32(t, w0, w1, c->xq + r * c->xs + 32 * (size_t)(g + j));
                    const __m256 sc = lg_block_scale(step, S[r], j);
                    acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc[r][a]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            c->out[(size_t)r * c->o_stride + i] = ws_hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), accm[r]));
    }
}
#endif

#if LG_SIMD || LG_AVX2
#if LG_AVX2
#define LG_STREAM_N(T, N) if (c->nb % 8 == 0) lg_rows8(T, N, c, r0, r1); else lg_stream_rows(T, N, c, r0, r1, scr);
#else
#define LG_STREAM_N(T, N) lg_stream_rows(T, N, c, r0, r1, scr);
#endif
#define LG_STREAM_R(T) switch (c->n) { case 1: LG_STREAM_N(T, 1) break; case 2: LG_STREAM_N(T, 2) break; case 3: LG_STREAM_N(T, 3) break; default: LG_STREAM_N(T, 4) break; }
static void lg_stream_chunk(const lg_ctx *c, int r0, int r1, float *scr) {
    switch (c->t) {
    case WS_Q4_0: LG_STREAM_R(WS_Q4_0) break;
    case WS_Q4_1: LG_STREAM_R(WS_Q4_1) break;
    case WS_Q5_0: LG_STREAM_R(WS_Q5_0) break;
    case WS_Q5_1: LG_STREAM_R(WS_Q5_1) break;
    default:      LG_STREAM_R(WS_Q8_0) break;
    }
}
#endif

/* dxr / csr for the decode stream: row r's dx and cs tiled (see lg_ctx), a row's nb at a time */
static void lg_tile_scales(int t, const float *dx, const float *cs, size_t fs, int n, int nb, size_t rs,
                           float *dxr, float *csr) {
    for (int r = 0; r < n; r++)
        for (size_t i = 0; i < rs; i += (size_t)nb) {
            const size_t m = rs - i < (size_t)nb ? rs - i : (size_t)nb;
            memcpy(dxr + r * rs + i, dx + r * fs, m * sizeof(float));
            memcpy(csr + r * rs + i, cs + r * fs, m * sizeof(float));
        }
#if LG_AVX2
    if (lg_step(t) == 2) {   /* dx in LG_SCALE_ORDER within each 8 stream positions (lg_stream_rows) */
        const __m256i order = _mm256_loadu_si256((const __m256i *)lg_scale_order);
        for (int r = 0; r < n; r++)
            for (size_t i = 0; i + 8 <= rs; i += 8)
                _mm256_storeu_ps(dxr + r * rs + i, _mm256_permutevar8x32_ps(_mm256_loadu_ps(dxr + r * rs + i), order));
    }
#else
    (void)t;
#endif
}

#define LG_TILE 4
#define LG_CB 128

static void lg_chunk(const lg_ctx *c, int r0, int r1, int tid) {
    if (r1 > c->rows) r1 = c->rows;
    if (c->t == WS_F32 || c->t == WS_F16 || c->t == WS_BF16) {
        for (int i0 = 0; i0 < c->n; i0 += LG_TILE) {
            int R = c->n - i0 < LG_TILE ? c->n - i0 : LG_TILE;
            for (int row = r0; row < r1; row++)
                ws_fdot(c->t, R, c->w + (size_t)row * c->w_stride, c->cols, c->x + (size_t)i0 * c->x_stride,
                        c->x_stride, c->out + (size_t)i0 * c->o_stride + row, c->o_stride);
        }
        return;
    }
#if LG_SIMD || LG_AVX2
    if (c->stream) {
        if (r1 > r0)
            lg_stream_chunk(c, r0, r1, c->fscratch + (size_t)tid * c->fscratch_floats);
        return;
    }
#endif
    lg_dot_fn dot = lg_dot_for(c->t);
    const int bs = ws_block_bytes(c->t);
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

#endif /* WS_LEGACY_H */
