/* What every kernel header and Cython module shares: the GGML type numbers, the block sizes,
 * and the little-endian / half-float loads. kernels/traits.py holds the same table on the Python
 * side (tests/test_kernels_api.py checks they agree); the block structs below exist only for the
 * static asserts, as in llama.cpp's ggml-common.h (the kernels read blocks by byte offset).
 */
#ifndef WS_COMMON_H
#define WS_COMMON_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define WS_INLINE static inline __attribute__((always_inline))
#else
#define WS_INLINE static inline
#endif

/* GGML type values as llama.cpp (and gguf.GGMLQuantizationType) number them */
enum {
    WS_F32 = 0, WS_F16 = 1, WS_Q4_0 = 2, WS_Q4_1 = 3, WS_Q5_0 = 6, WS_Q5_1 = 7, WS_Q8_0 = 8,
    WS_Q2_K = 10, WS_Q3_K = 11, WS_Q4_K = 12, WS_Q5_K = 13, WS_Q6_K = 14, WS_BF16 = 30,
};

#define WS_QK32 32    /* elements per block of the legacy types (QK4_0 .. QK8_0) */
#define WS_QK_K 256   /* elements per k-quant super-block */
#define WS_K_SCALE_SIZE 12

typedef uint16_t ws_half;  /* IEEE binary16 bits (ggml_half) */

/* ggml-common.h's blocks, field for field */
typedef struct { ws_half d; uint8_t qs[WS_QK32 / 2]; } ws_block_q4_0;
typedef struct { ws_half d, m; uint8_t qs[WS_QK32 / 2]; } ws_block_q4_1;
typedef struct { ws_half d; uint8_t qh[4]; uint8_t qs[WS_QK32 / 2]; } ws_block_q5_0;
typedef struct { ws_half d, m; uint8_t qh[4]; uint8_t qs[WS_QK32 / 2]; } ws_block_q5_1;
typedef struct { ws_half d; int8_t qs[WS_QK32]; } ws_block_q8_0;
typedef struct { uint8_t scales[WS_QK_K / 16]; uint8_t qs[WS_QK_K / 4]; ws_half d, dmin; } ws_block_q2_K;
typedef struct { uint8_t hmask[WS_QK_K / 8]; uint8_t qs[WS_QK_K / 4]; uint8_t scales[12]; ws_half d; } ws_block_q3_K;
typedef struct { ws_half d, dmin; uint8_t scales[WS_K_SCALE_SIZE]; uint8_t qs[WS_QK_K / 2]; } ws_block_q4_K;
typedef struct { ws_half d, dmin; uint8_t scales[WS_K_SCALE_SIZE]; uint8_t qh[WS_QK_K / 8]; uint8_t qs[WS_QK_K / 2]; } ws_block_q5_K;
typedef struct { uint8_t ql[WS_QK_K / 2]; uint8_t qh[WS_QK_K / 4]; int8_t scales[WS_QK_K / 16]; ws_half d; } ws_block_q6_K;

/* bytes per block; the asserts tie each number to its struct (and so to ggml-common.h) */
#define WS_Q4_0_BYTES 18
#define WS_Q4_1_BYTES 20
#define WS_Q5_0_BYTES 22
#define WS_Q5_1_BYTES 24
#define WS_Q8_0_BYTES 34
#define WS_Q2_K_BYTES 84
#define WS_Q3_K_BYTES 110
#define WS_Q4_K_BYTES 144
#define WS_Q5_K_BYTES 176
#define WS_Q6_K_BYTES 210
_Static_assert(sizeof(ws_block_q4_0) == WS_Q4_0_BYTES, "wrong q4_0 block size/padding");
_Static_assert(sizeof(ws_block_q4_1) == WS_Q4_1_BYTES, "wrong q4_1 block size/padding");
_Static_assert(sizeof(ws_block_q5_0) == WS_Q5_0_BYTES, "wrong q5_0 block size/padding");
_Static_assert(sizeof(ws_block_q5_1) == WS_Q5_1_BYTES, "wrong q5_1 block size/padding");
_Static_assert(sizeof(ws_block_q8_0) == WS_Q8_0_BYTES, "wrong q8_0 block size/padding");
_Static_assert(sizeof(ws_block_q2_K) == WS_Q2_K_BYTES, "wrong q2_K block size/padding");
_Static_assert(sizeof(ws_block_q3_K) == WS_Q3_K_BYTES, "wrong q3_K block size/padding");
_Static_assert(sizeof(ws_block_q4_K) == WS_Q4_K_BYTES, "wrong q4_K block size/padding");
_Static_assert(sizeof(ws_block_q5_K) == WS_Q5_K_BYTES, "wrong q5_K block size/padding");
_Static_assert(sizeof(ws_block_q6_K) == WS_Q6_K_BYTES, "wrong q6_K block size/padding");

/* elements per block (1 for the float types; 0: not a supported type) */
WS_INLINE int ws_block_elements(int t) {
    switch (t) {
    case WS_F32: case WS_F16: case WS_BF16: return 1;
    case WS_Q4_0: case WS_Q4_1: case WS_Q5_0: case WS_Q5_1: case WS_Q8_0: return WS_QK32;
    case WS_Q2_K: case WS_Q3_K: case WS_Q4_K: case WS_Q5_K: case WS_Q6_K: return WS_QK_K;
    default: return 0;
    }
}

/* bytes per block (0: not a supported type) */
WS_INLINE int ws_block_bytes(int t) {
    switch (t) {
    case WS_F32: return 4;
    case WS_F16: case WS_BF16: return 2;
    case WS_Q4_0: return WS_Q4_0_BYTES;
    case WS_Q4_1: return WS_Q4_1_BYTES;
    case WS_Q5_0: return WS_Q5_0_BYTES;
    case WS_Q5_1: return WS_Q5_1_BYTES;
    case WS_Q8_0: return WS_Q8_0_BYTES;
    case WS_Q2_K: return WS_Q2_K_BYTES;
    case WS_Q3_K: return WS_Q3_K_BYTES;
    case WS_Q4_K: return WS_Q4_K_BYTES;
    case WS_Q5_K: return WS_Q5_K_BYTES;
    case WS_Q6_K: return WS_Q6_K_BYTES;
    default: return 0;
    }
}

typedef union { float f; uint32_t u; } ws_f32;   /* float <-> bits */

/* GGUF is little-endian; unaligned loads (memcpy) on little-endian hosts. */
static inline uint16_t ws_load_u16(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return (uint16_t)(p[0] | (p[1] << 8));
#endif
}

static inline uint32_t ws_load_u32(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
#endif
}

/* IEEE binary16 -> binary32, exact for every input: zeros, subnormals, normals,
   infinities, and NaNs with sign and payload kept (no quieting, as NumPy's
   float16 -> float32 cast). Branch-free (masks, not if/else) so that GCC vectorises the
   F16 row loop: with branches it will not, as under its default -ftrapping-math it may
   not speculate the int -> float conversion. */
static inline float ws_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7FFFu;                          /* exponent and mantissa bits */
    /* normal, inf, nan: shift up 13 and rebias the exponent by 127 - 15 = 112; an
       all-ones exponent (31: inf / nan) must become 255, not 143: 112 more. */
    uint32_t special = 0u - (uint32_t)(em >= 0x7C00u);  /* all ones for inf / nan */
    uint32_t wide = (em << 13) + ((127u - 15u) << 23) + (special & ((255u - 143u) << 23));
    /* zero and subnormals: em * 2^-24, exact in float32 and never a float32 subnormal
       (so FTZ / DAZ modes cannot touch it). */
    ws_f32 sub;
    sub.f = (float)(int32_t)em * 0x1p-24f;
    uint32_t normal = 0u - (uint32_t)(em >= 0x0400u);   /* all ones unless zero / subnormal */
    ws_f32 r;
    r.u = sign | (wide & normal) | (sub.u & ~normal);
    return r.f;
}

/* the fp16 field at p (unaligned) as a float */
static inline float ws_half_at(const uint8_t *p) { return ws_fp16_to_fp32(ws_load_u16(p)); }

/* bfloat16 is the top half of a binary32. */
static inline float ws_bf16_to_fp32(uint16_t h) {
    ws_f32 r;
    r.u = (uint32_t)h << 16;
    return r.f;
}

/* A weight scale (fp16 d / dmin / m) with an Inf made NaN: (s - s) + s is s while finite. The
   reference's dequantized block holds 0 * Inf = NaN wherever a quant is 0 (or the min term
   cancels), so its outputs are NaN; the kernels that fold the offset into an exact int32 dot
   would give +/-Inf instead (an Inf min m / dmin too: the reference sums Inf * x of both signs).
   Every path applies it where it loads a scale: two operations per block, none per product.
   Kept as written: these kernels are built without -ffast-math. */
static inline float ws_inf_to_nan(float s) { return (s - s) + s; }

/* The NaN contract of the fused kernels (docs/DESIGN.md, kernels): an activation row holding a NaN
   or an Inf gives an all-NaN output row, as the float reference x @ W.T gives NaN there (an Inf
   may give +/-Inf in the reference; NaN here). Quantizing the row to int8 blocks loses the
   non-finite value (NaN scales to any int, Inf to a zero block), so the quantizers report each
   row (bad[i] != 0) while computing its absmax, and the row's outputs are overwritten after the
   dot products: no extra pass over the weights, one over the outputs of bad rows only.
   out: float[n][ostride], the first `rows` of each row written. */
static inline void ws_nan_rows(const uint8_t *bad, int64_t n, float *out, int64_t rows, int64_t ostride) {
    ws_f32 qnan;
    qnan.u = 0x7FC00000u;
    for (int64_t i = 0; i < n; i++)
        if (bad[i])
            for (int64_t j = 0; j < rows; j++) out[i * ostride + j] = qnan.f;
}

/* Every thread of the enclosing OpenMP parallel region waits here for the others (an orphaned
   barrier; nothing without OpenMP). Cython's prange inside a `with parallel()` block is an `omp
   for nowait`: a step that reads what the loop before it wrote must wait here. (GCC happens to
   put a barrier at the start of a loop with firstprivate copies, which Cython's loops have; that
   is a compiler's choice, not OpenMP's promise.) */
static inline void ws_omp_barrier(void) {
    _Pragma("omp barrier")
}

#endif /* WS_COMMON_H */
