# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Fused dequantize-matmul for the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), nogil, OpenMP.

``matmul_into(x, w, qtype, out, threads)`` computes ``out[n, rows] = x[n, cols] @ W.T`` straight
on the GGUF blocks of W, as llama.cpp does: the activations are first quantized to Q8_K (int8 per
256 with a float scale, bit-exact with ``weightstream.kernels.quantize.quantize_q8_k``), then each weight block
is multiplied in integers (exact) and scaled once per block in float. The result therefore equals
``weightstream.kernels.quantize.matmul_q8_ref`` up to float summation order.

Layout of the work:

* Q8_K scratch for all n rows is made once per call (``qs`` int8[n, cols], ``d`` float[n, nb],
  ``fb`` float[n, 16 nb]: each block's 16-float min-term slot, which carries the min / offset
  terms: on AVX-512 and AVX2 builds the int16 bsums in its first half (``BSUMS``;
  kquants_simd.h's WS_KQ_BSUMS), on scalar builds d * bsum per 16 as floats).
* Weight rows are split in groups of ``_WR`` over the threads (``prange``); inside a group, the
  activation rows go in equal tiles of up to WS_KQ_NRMAX (AVX-512 8, AVX2 6) and each weight
  row is unpacked once per tile, so an unpacked block serves a whole tile's rows from registers,
  while the group's weight bytes and the tile's activations stay in L1/L2.
* The per-block math lives in ``kquants_simd.h``: AVX-512 VNNI/VBMI intrinsics when the compiler
  targets them (-march=native on Zen 4 / Ice Lake and later), AVX2 + FMA + F16C intrinsics
  (256-bit: vpmaddubsw then vpmaddwd with the sub-block scales) on CPUs without AVX-512 (Zen 2 /
  Zen 3, Haswell to Comet Lake), portable scalar C otherwise (WEIGHTSTREAM_PORTABLE=1). ``ISA``
  names the one this build has (``SIMD``: the AVX-512 one).
* Q2_K with n >= ``_AMX_MIN_N`` activation rows (prefill, batched experts) goes to AMX-INT8 tiles
  instead (``kquants_amx.h``) when the build targets AMX and Linux grants the tile state
  (``AMX``): the Q8_K activations are repacked into the tiles' VNNI layout per 16 rows, and each
  thread unpacks 16 weight rows once per chunk of activation groups (sized to stay in L2).
* At decode (one row) the weight row groups go out guided (see _moe_decode_core); the decode
  step's MoE block is one call (``moe_decode_into``, ``moe_route_decode_into``), and where a
  model allows it the whole step's layers are one call (``decode_layers_into``,
  ``_decode_layers.pxi``, included at the end of this file).

Non-finite values (docs/DESIGN.md, kernels): an activation row holding a NaN or Inf gives an
all-NaN output row (the Q8_K quantizer flags the row while it scans for the absmax;
``ws_nan_rows`` overwrites its outputs after the dot products), as the float reference does; a NaN
weight scale (d, dmin) reaches the float products, an Inf one is made NaN where it is loaded
(``ws_inf_to_nan``: the reference's 0 * Inf is NaN).
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint64_t, uintptr_t

import numpy as np
from gguf import GGMLQuantizationType

from . import traits

cimport openmp
from libc.stdlib cimport free, malloc
from libc.string cimport memset
cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

# type numbers and block sizes (kernels/csrc/common.h)
cdef extern from "common.h" nogil:
    enum:
        WS_F32
        WS_Q2_K
        WS_QK_K
    int ws_block_bytes(int qtype)
    void ws_nan_rows(const uint8_t *bad, int64_t n, float *out, int64_t rows, int64_t ostride)
    void ws_omp_barrier()

# per-block math, AVX-512 or portable C (kernels/csrc/kquants_simd.h)
cdef extern from "kquants_simd.h" nogil:
    int WS_KQ_AVX512
    int WS_KQ_AVX2
    int WS_KQ_BSUMS
    int WS_KQ_NRMAX
    ctypedef struct ws_kq_act:
        const int8_t *qx
        const float *dx
        const float *fb
        int64_t qx_stride, dx_stride, fb_stride
    bint WS_KQ_PERMUTED(int qtype)
    int WS_KQ_PREFETCH
    void ws_kq_rows(int qtype, const uint8_t *w, int64_t nbk, const ws_kq_act *a, int nr,
                    float *accbuf, int first, int64_t pf)
    void ws_kq_stream(int qtype, const uint8_t *w, int64_t nrows, int64_t nbk, const ws_kq_act *a,
                      float *accbuf, int64_t acc_stride)
    void ws_kq_reduce16(const float *v, int64_t vstride, int m, float *out)

# Q8_K quantization of an activation row (kernels/csrc/q8k_simd.h)
cdef extern from "q8k_simd.h" nogil:
    int ws_quantize_row_q8k(const float *x, int64_t nb, int8_t *qs, float *d, float *fb, int permuted)

# the router of moe_route_decode_into: _legacy's float row dot (kernels/csrc/fdot.h)
cdef extern from "fdot.h" nogil:
    void ws_fdot(int t, int R, const uint8_t *w, int cols, const float *x, size_t xs, float *out, size_t os)

# SwiGLU, softmax, top k and the weighted sum of the fused MoE calls (kernels/csrc/ops_simd.h, shared with _ops)
cdef extern from "ops_simd.h" nogil:
    void ws_softmax_row(const float *x, int64_t n, float *out)
    void ws_topk_weights_row(const float *p, int64_t n, int64_t k, int choose, int norm, int64_t *ids,
                             float *w)
    void ws_swiglu_row(const float *gate, const float *up, int64_t m, float *out)
    void ws_scale_add_row(float *out, float *y, float w, int64_t n)

# Q2_K prefill on AMX tiles (kernels/csrc/kquants_amx.h)
cdef extern from "kquants_amx.h" nogil:
    int WS_KQ_AMX
    int WS_AMX_WBLK
    int WS_AMX_XBLK
    int ws_amx_request()
    void ws_amx_pack_act(const int8_t *qs, const float *dq, int64_t n, int64_t nb, int64_t r0,
                         uint8_t *dst)
    void ws_amx_q2k_group(const uint8_t *w, int64_t row_bytes, int64_t nb, int64_t i0, int nrw,
                          const uint8_t *xact, int64_t g0, int64_t g1, int64_t n, float *out,
                          int64_t ostride, uint8_t *scratch, int32_t *cbuf)

include "matmul_args.pxi"

cdef enum:
    QK_K = WS_QK_K
    Q2_K = WS_Q2_K

SUPPORTED = frozenset(int(q) for q in traits.types_on("cython", traits.K_QUANT))
BLOCK_BYTES = {q: ws_block_bytes(q) for q in SUPPORTED}
SIMD = bool(WS_KQ_AVX512)
ISA = "avx512" if WS_KQ_AVX512 else "avx2" if WS_KQ_AVX2 else "scalar"  # the block kernels built
BSUMS = bool(WS_KQ_BSUMS)  # the min-term slots hold int16 bsums, not d * bsum floats (AVX-512 and AVX2 builds)
# AMX tiles usable: compiled for AMX-INT8 and the tile state granted by the kernel (once per process)
AMX = bool(WS_KQ_AMX) and bool(ws_amx_request())
cdef bint AMX_ON = AMX   # (the same, readable without the GIL)

# weight rows per work item: enough that a tile of activations is reused across them from cache
cdef int _WR = 16
# bytes of one activation row per block: 256 int8 + the 64-byte min-term slot fb + 1 float d
cdef int _ACT_BLOCK_BYTES = 256 + 64 + 4
# L1 bytes for a tile's activations; the row tile is cut into block ranges that fit
cdef int _L1_ACT = 16384
cdef int _L1_MAX = 24576     # ... unless the whole tile fits in this (then no cut)
# L2 bytes for the activation rows every weight group of a call passes over: a prompt's rows are
# taken in chunks that fit (each chunk a multiple of WS_KQ_NRMAX rows: the same tiles, the same
# bits). 512 rows of 2048 columns are 1.3 MB, read again from L3 for each 16-row weight group
# otherwise (the gain was inside the Zen 3 host's noise when measured: kept for the traffic)
cdef int64_t _L2_ACT = 262144


cdef inline int64_t _act_chunk_rows(int64_t n, int64_t nb) noexcept nogil:
    """Activation rows per chunk (see _L2_ACT): n when they all fit."""
    cdef int64_t per = max(<int64_t>1, _L2_ACT // (nb * _ACT_BLOCK_BYTES) // WS_KQ_NRMAX) * WS_KQ_NRMAX
    return n if n <= per else per


# Q2_K with at least this many activation rows uses the AMX tiles (below: n % 16 padding and the
# per-16-rows weight unpack cost more than AVX-512 saves; measured 14336x4096, one thread:
# n = 6: AMX 5.6 ms, AVX-512 4.1 ms; n = 8: 5.6 vs 7.1 ms; n = 12: 8.2 vs 14.3 ms)
cdef int64_t _AMX_MIN_N = 8
# L2 bytes for the packed activations one weight-row unpack serves (a chunk of 16-row groups)
cdef int64_t _AMX_ACT_L2 = 1 << 20


def _amx_tuning(min_n=None, act_l2=None):
    """Set / read the AMX constants (for tests and benchmarks): (smallest n for the AMX path, a
    huge value turns it off; L2 bytes of packed activations per chunk)."""
    global _AMX_MIN_N, _AMX_ACT_L2
    if min_n is not None:
        _AMX_MIN_N = max(1, int(min_n))
    if act_l2 is not None:
        _AMX_ACT_L2 = max(1, int(act_l2))
    return _AMX_MIN_N, _AMX_ACT_L2


def _tuning(wr=None, l1_act=None, l1_max=None):
    """Set / read the tiling constants (for benchmarks): (weight rows per work item, L1 bytes for
    a tile's activations, largest tile left uncut)."""
    global _WR, _L1_ACT, _L1_MAX
    if wr is not None:
        _WR = max(1, int(wr))
    if l1_act is not None:
        _L1_ACT = max(1, int(l1_act))
    if l1_max is not None:
        _L1_MAX = max(1, int(l1_max))
    return _WR, _L1_ACT, _L1_MAX


cdef inline int64_t _scratch_floats() noexcept nogil:
    """Floats of one thread's _group scratch: the partial sums [_WR][WS_KQ_NRMAX][16] (a multiple
    of 16 floats, so every thread's part stays 64-byte aligned)."""
    return _WR * 16 * WS_KQ_NRMAX


cdef struct _Arena:
    # one aligned C allocation a call carves its scratch from (freed at its end): at decode a
    # call's five NumPy scratch arrays and their memoryviews cost ~3 us, ~145 calls a step
    uint8_t *base
    size_t used, size


cdef int _arena_open(_Arena *a, size_t nbytes) except -1:
    """nbytes: the pieces' sizes summed; room is added for up to 32 pieces' 64-byte rounding."""
    a.size = (nbytes + 64 * 32 + 63) // 64 * 64
    a.base = <uint8_t *>aligned_alloc(64, a.size)
    a.used = 0
    if a.base == NULL:
        raise MemoryError(f"kernel scratch of {nbytes} bytes")
    return 0


cdef inline void *_take(_Arena *a, size_t nbytes) except NULL:
    """The next nbytes of the arena, 64-byte aligned; an error (not a write past its end) where
    the pieces taken outgrow what _arena_open was told."""
    cdef size_t rounded = (nbytes + 63) // 64 * 64
    if a.used + rounded > a.size:
        raise RuntimeError(f"kernel scratch: {a.used} + {rounded} bytes taken from {a.size}")
    cdef void *p = a.base + a.used
    a.used += rounded
    return p


cdef struct _Q8K:
    # Q8_K activations carved from an arena (_q8k_take): qs int8[elements], dq float[elements / 256]
    # (block scales), fb float[16 * elements / 256] (min-term slots: BSUMS), bad uint8[rows] (a row
    # holds a NaN / Inf: ws_nan_rows)
    int8_t *qs
    float *dq
    float *fb
    uint8_t *bad


cdef inline size_t _q8k_bytes(int64_t elements, int64_t rows) noexcept nogil:
    """The arena bytes _q8k_take(elements, rows) takes (before its 64-byte rounding)."""
    return elements + 4 * (elements // QK_K) + 64 * (elements // QK_K) + rows


cdef int _q8k_take(_Arena *a, int64_t elements, int64_t rows, _Q8K *q) except -1:
    """Q8_K room for `rows` activation rows of `elements` values in all (multiples of 256 each),
    bad flags cleared."""
    q.qs = <int8_t *>_take(a, elements)
    q.dq = <float *>_take(a, 4 * (elements // QK_K))
    q.fb = <float *>_take(a, 64 * (elements // QK_K))
    q.bad = <uint8_t *>_take(a, rows)
    memset(q.bad, 0, rows)
    return 0


cdef inline uint8_t _quantize_row_q8_k(const float *x, int64_t nb, int8_t *qs, float *d, float *fb,
                                       bint permuted) noexcept nogil:
    """ggml's quantize_row_q8_K_ref on one row of nb blocks, plus the min-term slots fb (d * bsum
    per 16, or the int16 bsums where BSUMS; kernels/csrc/q8k_simd.h). With ``permuted``, each block's quants are stored in the kernel's
    order (WS_KQ_PERMUTED). Returns 1 when the row holds a NaN or an Inf (see ws_nan_rows)."""
    return <uint8_t>ws_quantize_row_q8k(x, nb, qs, d, fb, permuted)


def quantize_q8_k_into(const float[:, ::1] x, bint permuted=False):
    """The kernels' own Q8_K of x: float32[n, cols] (cols a multiple of 256), for tests:
    (qs int8[n, cols], d float32[n, nb], fb float32[n, 16 nb], bad uint8[n]); where BSUMS,
    fb's bytes hold each block's 16 int16 bsums in the first half of its 16 floats."""
    cdef int64_t n = x.shape[0], cols = x.shape[1], r
    if cols % QK_K:
        raise ValueError(f"quantize_q8_k_into: {cols} columns, not a multiple of {QK_K}")
    cdef int64_t nb = cols // QK_K
    qs_arr, d_arr = np.zeros((n, cols), np.int8), np.zeros((n, nb), np.float32)
    fb_arr, bad_arr = np.zeros((n, 16 * nb), np.float32), np.zeros(n, np.uint8)
    cdef int8_t[:, ::1] qs = qs_arr
    cdef float[:, ::1] d = d_arr
    cdef float[:, ::1] fb = fb_arr
    cdef uint8_t[::1] bad = bad_arr
    if n and nb:
        for r in range(n):
            bad[r] = _quantize_row_q8_k(&x[r, 0], nb, &qs[r, 0], &d[r, 0], &fb[r, 0], permuted)
    return qs_arr, d_arr, fb_arr, bad_arr


cdef void _group(int qtype, const uint8_t *w, int64_t i0, int64_t i1, int64_t row_bytes,
                 int64_t bb, int64_t n, int64_t rows, int64_t cols, const int8_t *qs,
                 const float *dq, const float *fb, float *accbuf, float *out) noexcept nogil:
    """Weight rows i0..i1 against all activation rows: equal tiles of up to WS_KQ_NRMAX (8 or 6) activation
    rows; each tile in block ranges whose activations stay in L1 while the group's rows pass over
    them, the 16-lane partial sums of each (weight row, activation row) in accbuf (this thread's
    _scratch_floats(): [_WR][WS_KQ_NRMAX][16]), summed 16 weight rows at a time (ws_kq_reduce16)
    when the tile's blocks are done."""
    cdef int64_t nb = cols // QK_K
    cdef int64_t r0 = 0, b0, nbk, kc, i, j0
    cdef int nr, r
    cdef ws_kq_act act
    act.qx_stride = cols
    act.dx_stride = nb
    act.fb_stride = 16 * nb
    cdef int64_t tiles
    while r0 < n:
        # the rows left in equal tiles of at most WS_KQ_NRMAX (12 rows: 6 + 6, not 8 + 4): the
        # same unpacks, and no short tile whose rows carry a whole unpack each
        tiles = (n - r0 + WS_KQ_NRMAX - 1) // WS_KQ_NRMAX
        nr = <int>((n - r0 + tiles - 1) // tiles)
        kc = nb
        if nr * nb * _ACT_BLOCK_BYTES > _L1_MAX:
            kc = max(<int64_t>1, _L1_ACT // (nr * _ACT_BLOCK_BYTES))
        b0 = 0
        while b0 < nb:
            nbk = min(kc, nb - b0)
            act.qx = qs + r0 * cols + QK_K * b0
            act.dx = dq + r0 * nb + b0
            act.fb = fb + r0 * 16 * nb + 16 * b0
            if n == 1 and nbk == nb and row_bytes == nb * bb:  # decode, whole rows: one block stream
                ws_kq_stream(qtype, w + i0 * row_bytes, i1 - i0, nb, &act, accbuf, 16 * WS_KQ_NRMAX)
            else:
                for i in range(i0, i1):  # (cut in block ranges: prefetch the next row's range)
                    ws_kq_rows(qtype, w + i * row_bytes + b0 * bb, nbk, &act, nr,
                               accbuf + (i - i0) * 16 * WS_KQ_NRMAX, b0 == 0,
                               WS_KQ_PREFETCH if kc == nb else row_bytes)
            b0 = b0 + nbk
        for r in range(nr):  # out[r0 + r, i0..i1]: contiguous, 16 weight rows per reduction tree
            j0 = i0
            while j0 < i1:
                ws_kq_reduce16(accbuf + (j0 - i0) * 16 * WS_KQ_NRMAX + 16 * r, 16 * WS_KQ_NRMAX,
                               <int>min(<int64_t>16, i1 - j0), out + (r0 + r) * rows + j0)
                j0 = j0 + 16
        r0 = r0 + nr


cdef void _matmul_core(const float *x, const uint8_t *w, int qtype, float *out, int64_t n,
                       int64_t rows, int64_t cols, int64_t bb, int8_t *qs, float *dq,
                       float *fb, float *accbuf, uint8_t *bad, int threads) noexcept nogil:
    cdef int64_t nb = cols // QK_K
    cdef int64_t r, g, i0, c0
    cdef int64_t ngroups = (rows + _WR - 1) // _WR
    if n == 1:  # decode: one row is a microsecond of work, not worth waking a team for
        bad[0] = _quantize_row_q8_k(x, nb, qs, dq, fb, WS_KQ_PERMUTED(qtype))
    else:
        for r in prange(n, num_threads=threads, schedule="static"):
            bad[r] = _quantize_row_q8_k(x + r * cols, nb, qs + r * cols, dq + r * nb, fb + r * 16 * nb,
                                        WS_KQ_PERMUTED(qtype))
    cdef int64_t chunk = _act_chunk_rows(n, nb)
    if n == 1:  # decode: the row groups handed out guided (see _moe_decode_core)
        for g in prange(ngroups, num_threads=threads, schedule="guided"):
            i0 = g * _WR
            _group(qtype, w, i0, min(i0 + _WR, rows), nb * bb, bb, 1, rows, cols, qs, dq, fb,
                   accbuf + openmp.omp_get_thread_num() * _scratch_floats(), out)
    else:
        for g in prange(((n + chunk - 1) // chunk) * ngroups, num_threads=threads, schedule="static"):
            c0 = (g // ngroups) * chunk  # the chunk's first activation row; its weight group g % ngroups
            i0 = (g % ngroups) * _WR
            _group(qtype, w, i0, min(i0 + _WR, rows), nb * bb, bb, min(chunk, n - c0), rows, cols,
                   qs + c0 * cols, dq + c0 * nb, fb + c0 * 16 * nb,
                   accbuf + openmp.omp_get_thread_num() * _scratch_floats(), out + c0 * rows)
    ws_nan_rows(bad, n, out, rows, rows)


cdef inline int64_t _amx_chunks(int64_t groups, int64_t nb) noexcept nogil:
    """Chunks an AMX task's `groups` packed 16-row activation groups are cut into (balanced, none
    empty) so that one chunk's fit _AMX_ACT_L2: each weight group's unpack then serves a chunk
    read from L2 (the whole of a 512-token prompt's would not fit)."""
    cdef int64_t per = max(<int64_t>1, _AMX_ACT_L2 // (nb * WS_AMX_XBLK))
    return (groups + per - 1) // per


cdef void _moe_decode_core(const float *h, const uint8_t **wgu, int qgu, const uint8_t **wd, int qd,
                           const float *weights, int64_t k, int64_t E, int64_t ff, int8_t *qs,
                           float *dq, float *fb, float *gu, float *act, float *y, float *out,
                           float *accbuf, uint8_t *bad, int threads) noexcept nogil:
    """One decode step's k routed experts in one parallel region (see moe_decode_into). Scratch:
    qs int8[E + k ff], dq float[nbe + k nbf], fb float[16 (nbe + k nbf)] (h's Q8_K, then each
    activation row's); gu float[2k, ff]; act float[k, ff]; bad uint8[1 + k].
    The row groups go out guided (halving chunks from a shared counter), not in static halves:
    the two halves' memory reads take different times region by region, and with static halves
    the thread done first waited at every barrier for the other. 30B-A3B tg32 on 2 Zen 4 threads:
    1.06x (in-process A/B and alternating rounds); libgomp's share of the perf samples varied
    too much between runs to show the mechanism itself (static 12-15%, guided 8-12%)."""
    cdef int64_t nbe = E // QK_K, nbf = ff // QK_K
    cdef int64_t bbgu = ws_block_bytes(qgu), bbd = ws_block_bytes(qd)
    cdef int64_t ngu = (ff + _WR - 1) // _WR, nd = (E + _WR - 1) // _WR
    cdef int64_t nch = (E + 63) // 64  # the weighted sum in chunks of 64 columns
    cdef int64_t r, j, t, i0, c, c0, c1, col
    cdef int8_t *qa = qs + E           # the activation rows' Q8_K, after h's
    cdef float *da = dq + nbe
    cdef float *fa = fb + 16 * nbe
    cdef float *acc
    with parallel(num_threads=threads):
        acc = accbuf + openmp.omp_get_thread_num() * _scratch_floats()
        # h once, in the gate/up type's order: every gate and up row group reads the same copy
        for r in prange(1, schedule="static"):
            bad[0] = _quantize_row_q8_k(h, nbe, qs, dq, fb, WS_KQ_PERMUTED(qgu))
        ws_omp_barrier()  # every gate / up row reads h's Q8_K
        for j in prange(2 * k * ngu, schedule="guided"):  # (gate or up of expert t, row group)
            t = j // ngu
            i0 = (j % ngu) * _WR
            _group(qgu, wgu[t], i0, min(i0 + _WR, ff), nbe * bbgu, bbgu, 1, ff, E, qs, dq, fb,
                   acc, gu + t * ff)
        ws_omp_barrier()  # SwiGLU reads every gate and up row
        for r in prange(k, schedule="static"):  # SwiGLU, then the row's Q8_K in down's order
            if bad[0]:
                ws_nan_rows(bad, 1, gu + r * ff, ff, ff)
                ws_nan_rows(bad, 1, gu + (k + r) * ff, ff, ff)
            ws_swiglu_row(gu + r * ff, gu + (k + r) * ff, ff, act + r * ff)
            bad[1 + r] = _quantize_row_q8_k(act + r * ff, nbf, qa + r * ff, da + r * nbf,
                                            fa + 16 * r * nbf, WS_KQ_PERMUTED(qd))
        ws_omp_barrier()  # the down rows read every SwiGLU row and its Q8_K
        for j in prange(k * nd, schedule="guided"):  # (down of expert t, row group)
            t = j // nd
            i0 = (j % nd) * _WR
            _group(qd, wd[t], i0, min(i0 + _WR, E), nbf * bbd, bbd, 1, E, ff, qa + t * ff,
                   da + t * nbf, fa + 16 * t * nbf, acc, y + t * E)
        ws_omp_barrier()  # the sum reads every expert's output
        for c in prange(nch, schedule="static"):  # out = sum over t in order of w_t * y_t
            c0 = c * 64
            c1 = min(c0 + 64, E)
            for col in range(c0, c1):
                out[col] = 0
            for t in range(k):
                if bad[1 + t]:
                    ws_nan_rows(bad + 1 + t, 1, y + t * E + c0, c1 - c0, c1 - c0)
                ws_scale_add_row(out + c0, y + t * E + c0, weights[t], c1 - c0)


_TYPE_NAMES = {int(t): t.name for t in GGMLQuantizationType}


def matmul_into(const float[:, ::1] x, const uint8_t[:, ::1] w, int qtype, float[:, ::1] out,
                int threads=1):
    """``out[n, rows] = x[n, cols] @ W.T``, W being ``rows`` GGUF rows of ``cols // 256`` blocks of
    ``qtype`` (``w``: uint8[rows, row_bytes], C-contiguous). Activations are quantized to Q8_K on
    the fly; ``threads`` OpenMP threads. Results do not depend on ``threads``."""
    if qtype not in SUPPORTED:
        names = ", ".join(GGMLQuantizationType(q).name for q in sorted(SUPPORTED))
        try:
            got = GGMLQuantizationType(qtype).name
        except ValueError:
            got = repr(qtype)
        raise ValueError(f"matmul_into: GGML type {got} is not supported (supported: {names})")
    if threads < 1:
        raise ValueError(f"matmul_into: threads must be >= 1, got {threads}")
    cdef int64_t n = x.shape[0], cols = x.shape[1], rows = w.shape[0]
    name = _TYPE_NAMES[qtype]  # a dict lookup: an enum construction per call costs ~1 us at decode
    cdef int64_t bb = BLOCK_BYTES[qtype]
    _check_matmul_args("matmul_into", name, n, cols, rows, w.shape[1], bb, out.shape[0], out.shape[1])
    cdef int64_t nb = cols // QK_K
    if n == 0 or rows == 0:
        return
    if cols == 0:
        out[:, :] = 0
        return
    # Q8_K scratch for all activation rows, once per call: qs int8[n, cols], dq float[n, nb],
    # fb float[n, 16 nb], bad uint8[n] (row holds a NaN / Inf: ws_nan_rows); then either the
    # AMX buffers or each thread's partial sums (_group)
    cdef bint amx = _amx_task(qtype, n)
    cdef int64_t ngx = (n + 15) // 16
    cdef size_t act_bytes = _q8k_bytes(n * cols, n)
    # one AMX task of _matmul_many_core: its rows' addresses, the task's fields (int64[8])
    cdef size_t amx_bytes = 8 * n + 8 * 8 + ngx * nb * WS_AMX_XBLK + threads * nb * WS_AMX_WBLK + threads * 4096
    cdef _Arena a
    _arena_open(&a, act_bytes + (amx_bytes if amx else 4 * threads * _scratch_floats()))
    cdef _Q8K q
    cdef const float **xr
    cdef int64_t *task
    cdef const uint8_t *wp
    cdef float *op
    cdef int64_t r
    cdef uint8_t *xact
    cdef uint8_t *scratch
    cdef int32_t *cbuf
    cdef float *acc
    try:
        _q8k_take(&a, n * cols, n, &q)
        if amx:
            # task 0 = all n rows: xr[n] row addresses; w, out, n, first row, amx id, first group
            # (and the end), first chunk (and the end); packed activations uint8[ngx][nb][WS_AMX_XBLK];
            # per thread: weight scratch uint8[nb][WS_AMX_WBLK] and tile results int32[2][2][16 * 16]
            xr = <const float **>_take(&a, 8 * n)
            task = <int64_t *>_take(&a, 8 * 8)
            for r in range(n):
                xr[r] = &x[r, 0]
            wp, op = &w[0, 0], &out[0, 0]
            task[0], task[1], task[2], task[3], task[4] = n, 0, 0, 0, ngx   # n, first, amx id, xgroup[0..1]
            task[5], task[6] = 0, _amx_chunks(ngx, nb)                    # xchunk[0..1]
            xact = <uint8_t *>_take(&a, ngx * nb * WS_AMX_XBLK)
            scratch = <uint8_t *>_take(&a, threads * nb * WS_AMX_WBLK)
            cbuf = <int32_t *>_take(&a, threads * 4096)
            with nogil:
                _matmul_many_core(xr, &wp, &op, task, task + 1, qtype, 1, n, rows, cols, bb, q.qs, q.dq,
                                  q.fb, NULL, q.bad, NULL, 0, task + 2, 1, task + 3, task + 5, xact,
                                  scratch, cbuf, threads)
        else:
            acc = <float *>_take(&a, 4 * threads * _scratch_floats())
            with nogil:
                _matmul_core(&x[0, 0], &w[0, 0], qtype, &out[0, 0], n, rows, cols, bb, q.qs, q.dq, q.fb,
                             acc, q.bad, threads)
    finally:
        free(a.base)


def matmul_many_supported(int qtype, int64_t n):
    """Whether matmul_many_into takes a task of n activation rows of qtype with the bits
    matmul_into gives it (every k-quant and row count: tasks matmul_into would take to AMX tiles
    go to them here too)."""
    return qtype in SUPPORTED


cdef inline bint _amx_task(int qtype, int64_t n) noexcept nogil:
    """Whether matmul_into takes n rows of qtype to the AMX tiles."""
    return AMX_ON and qtype == Q2_K and n >= _AMX_MIN_N


cdef void _matmul_many_core(const float **xr, const uint8_t **w, float **o, const int64_t *n,
                            const int64_t *first_row, int qtype, int64_t tasks, int64_t total,
                            int64_t rows, int64_t cols, int64_t bb, int8_t *qs, float *dq, float *fb,
                            float *accbuf, uint8_t *bad, const int64_t *vec_ids, int64_t nvec,
                            const int64_t *amx_ids, int64_t namx, const int64_t *xgroup,
                            const int64_t *xchunk, uint8_t *xact, uint8_t *scratch, int32_t *cbuf,
                            int threads) noexcept nogil:
    """Task t: o[t][n[t], rows] = its n[t] activation rows (xr[first_row[t] + r]) @ W_t.T. Every
    row's Q8_K; then every (task, row group) pair of the tasks vec_ids[0..nvec) (AVX-512), each
    made by _group as _matmul_core makes it for that task alone; then the tasks amx_ids[0..namx)
    on AMX tiles (matmul_into's AMX path is this with one task): task amx_ids[i]'s activation
    groups packed at xact + xgroup[i] * nb * WS_AMX_XBLK (xgroup[namx]: all of them) and cut into
    the chunks xchunk[i]..xchunk[i + 1] (_amx_chunks), then every (chunk, 16-row weight group)
    pair, each thread with its own scratch and cbuf. Each output is made by one thread in a fixed
    order: threads do not change results."""
    cdef int64_t nb = cols // QK_K
    cdef int64_t ngroups = (rows + _WR - 1) // _WR, ngw = (rows + 15) // 16
    cdef int64_t r, j, t, i0, f, i, g, c, per, g0
    for r in prange(total, num_threads=threads, schedule="static"):
        bad[r] = _quantize_row_q8_k(xr[r], nb, qs + r * cols, dq + r * nb, fb + r * 16 * nb,
                                    WS_KQ_PERMUTED(qtype))
    # guided: the tasks' row counts differ (a prompt's experts get 1 to ~20 tokens each), so equal
    # shares of (task, group) pairs are not equal work; each pair is still made by one thread
    for j in prange(nvec * ngroups, num_threads=threads, schedule="guided"):
        t = vec_ids[j // ngroups]
        i0 = (j % ngroups) * _WR
        f = first_row[t]
        _group(qtype, w[t], i0, min(i0 + _WR, rows), nb * bb, bb, n[t], rows, cols, qs + f * cols,
               dq + f * nb, fb + f * 16 * nb, accbuf + openmp.omp_get_thread_num() * _scratch_floats(), o[t])
    if namx > 0:
        for g in prange(xgroup[namx], num_threads=threads, schedule="static"):
            i = 0
            while xgroup[i + 1] <= g:
                i = i + 1
            t = amx_ids[i]
            f = first_row[t]
            ws_amx_pack_act(qs + f * cols, dq + f * nb, n[t], nb, 16 * (g - xgroup[i]),
                            xact + g * nb * WS_AMX_XBLK)
        for j in prange(xchunk[namx] * ngw, num_threads=threads, schedule="static"):
            c = j // ngw   # the chunk: c - xchunk[i] of task amx_ids[i]'s, `per` groups each
            i = 0
            while xchunk[i + 1] <= c:
                i = i + 1
            t = amx_ids[i]
            g = xgroup[i + 1] - xgroup[i]
            per = (g + xchunk[i + 1] - xchunk[i] - 1) // (xchunk[i + 1] - xchunk[i])
            g0 = (c - xchunk[i]) * per
            r = openmp.omp_get_thread_num()
            ws_amx_q2k_group(w[t], nb * 84, nb, 16 * (j % ngw), <int>min(<int64_t>16, rows - 16 * (j % ngw)),
                             xact + xgroup[i] * nb * WS_AMX_XBLK, g0, min(g0 + per, g), n[t], o[t],
                             rows, scratch + r * nb * WS_AMX_WBLK, cbuf + r * 1024)
    for t in range(tasks):
        ws_nan_rows(bad + first_row[t], n[t], o[t], rows, rows)


def matmul_many_into(list xs, list ws, int qtype, list outs, int threads=1):
    """``outs[t] = xs[t] @ ws[t].T`` for each task t, in one call: a prompt batch's routed experts,
    each with the few tokens routed to it, instead of a matmul_into call each (its Python, its
    arena and its parallel regions: at 16 threads what a prefill's experts cost most). xs[t]:
    float32[n_t, cols], ws[t]: uint8[rows, row_bytes] of qtype (all one shape), outs[t]:
    float32[n_t, rows], all C-contiguous. Each output has the bits matmul_into gives that task
    alone: tasks matmul_into would take to AMX tiles (Q2_K, n_t >= the cut-off) go to them, with
    their activations packed once for all of them and every (task, 16-row weight group) pair in
    one parallel region (each was three calls of its own, whose packing ran on one thread)."""
    cdef int64_t tasks = len(xs)
    if len(ws) != tasks or len(outs) != tasks:
        raise ValueError(f"matmul_many_into: {tasks} inputs, {len(ws)} weights, {len(outs)} outputs")
    if tasks == 0:
        return
    if qtype not in SUPPORTED or threads < 1:
        raise ValueError(f"matmul_many_into: type {_TYPE_NAMES.get(qtype, qtype)}, threads {threads}")
    cdef const float[:, ::1] xv
    cdef const uint8_t[:, ::1] wv
    cdef float[:, ::1] ov
    xv = xs[0]
    wv = ws[0]
    cdef int64_t cols = xv.shape[1], rows = wv.shape[0], bb = BLOCK_BYTES[qtype]
    if cols % QK_K:
        raise ValueError(f"matmul_many_into: x has {cols} columns, not a multiple of {QK_K}")
    cdef int64_t nb = cols // QK_K, total = 0, groups = 0, t, r, nvec = 0, namx = 0
    for t in range(tasks):
        xv = xs[t]
        total += xv.shape[0]
        if _amx_task(qtype, xv.shape[0]):
            groups += (xv.shape[0] + 15) // 16
    cdef _Arena a
    # the tasks' addresses and row counts, the AVX-512 / AMX task lists, the AMX tasks' first
    # groups and chunks, each row's address, the rows' Q8_K, each thread's sums; the AMX tasks'
    # packed activations, each thread's weight scratch and tile results
    cdef size_t amx_bytes = groups * nb * WS_AMX_XBLK + threads * nb * WS_AMX_WBLK + threads * 4096 if groups else 0
    _arena_open(&a, 8 * 9 * tasks + 16 + 8 * total + _q8k_bytes(total * cols, total)
                + 4 * threads * _scratch_floats() + amx_bytes)
    cdef const uint8_t **wp
    cdef float **op
    cdef int64_t *n
    cdef int64_t *first
    cdef int64_t *vec_ids
    cdef int64_t *amx_ids
    cdef int64_t *xgroup
    cdef int64_t *xchunk
    cdef const float **xr
    cdef _Q8K q
    cdef float *acc
    cdef uint8_t *xact = NULL
    cdef uint8_t *scratch = NULL
    cdef int32_t *cbuf = NULL
    try:
        wp = <const uint8_t **>_take(&a, 8 * tasks)
        op = <float **>_take(&a, 8 * tasks)
        n = <int64_t *>_take(&a, 8 * tasks)
        first = <int64_t *>_take(&a, 8 * tasks)
        vec_ids = <int64_t *>_take(&a, 8 * tasks)
        amx_ids = <int64_t *>_take(&a, 8 * tasks)
        xgroup = <int64_t *>_take(&a, 8 * tasks + 8)
        xchunk = <int64_t *>_take(&a, 8 * tasks + 8)
        xgroup[0] = xchunk[0] = 0
        xr = <const float **>_take(&a, 8 * total + 8 * tasks)
        total = 0
        for t in range(tasks):
            xv, wv, ov = xs[t], ws[t], outs[t]
            if xv.shape[1] != cols or wv.shape[0] != rows or wv.shape[1] != nb * bb \
                    or ov.shape[0] != xv.shape[0] or ov.shape[1] != rows:
                raise ValueError(f"matmul_many_into: task {t}: x [{xv.shape[0]}, {xv.shape[1]}], w uint8"
                                 f"[{wv.shape[0]}, {wv.shape[1]}], out [{ov.shape[0]}, {ov.shape[1]}]; "
                                 f"need x [n, {cols}], w [{rows}, {nb * bb}], out [n, {rows}]")
            wp[t], op[t], n[t], first[t] = &wv[0, 0], &ov[0, 0], xv.shape[0], total
            for r in range(xv.shape[0]):
                xr[total + r] = &xv[r, 0]
            total += xv.shape[0]
            if _amx_task(qtype, n[t]):
                amx_ids[namx] = t
                xgroup[namx + 1] = xgroup[namx] + (n[t] + 15) // 16
                xchunk[namx + 1] = xchunk[namx] + _amx_chunks((n[t] + 15) // 16, nb)
                namx += 1
            else:
                vec_ids[nvec] = t
                nvec += 1
        _q8k_take(&a, total * cols, total, &q)
        acc = <float *>_take(&a, 4 * threads * _scratch_floats())
        if namx:
            xact = <uint8_t *>_take(&a, groups * nb * WS_AMX_XBLK)
            scratch = <uint8_t *>_take(&a, threads * nb * WS_AMX_WBLK)
            cbuf = <int32_t *>_take(&a, threads * 4096)
        with nogil:
            _matmul_many_core(xr, wp, op, n, first, qtype, tasks, total, rows, cols, bb, q.qs, q.dq, q.fb,
                              acc, q.bad, vec_ids, nvec, amx_ids, namx, xgroup, xchunk, xact, scratch, cbuf,
                              threads)
    finally:
        free(a.base)

def matvec_many_supported(int qtype):
    """Whether matvec_many_into handles qtype with the bits matmul_into gives one row (not when
    matmul_into itself would take the AMX path at n = 1)."""
    return qtype in SUPPORTED and not (AMX and qtype == Q2_K and _AMX_MIN_N <= 1)


def matvec_many_into(const float[:, ::1] x, list ws, int qtype, float[:, ::1] out, int threads=1):
    """``out[t] = x[t] @ W_t.T`` for each task t: one activation row through its own weight matrix
    ``ws[t]`` (uint8[rows, row_bytes], C-contiguous; all of ``qtype`` and one shape), in a single
    parallel region: a decode step's routed experts at once instead of a small call each. Each
    output row has the same bits as ``matmul_into`` gives for that row alone."""
    cdef int64_t tasks = len(ws)
    if x.shape[0] != tasks or out.shape[0] != tasks:
        raise ValueError(f"matvec_many_into: {tasks} weights, x has {x.shape[0]} rows, out {out.shape[0]}")
    if tasks == 0:
        return
    if not matvec_many_supported(qtype):
        raise ValueError(f"matvec_many_into: type {_TYPE_NAMES.get(qtype, qtype)} is not supported")
    if threads < 1:
        raise ValueError(f"matvec_many_into: threads must be >= 1, got {threads}")
    cdef int64_t cols = x.shape[1], bb = BLOCK_BYTES[qtype]
    if cols % QK_K:
        raise ValueError(f"matvec_many_into: x has {cols} columns, not a multiple of {QK_K}")
    cdef int64_t nb = cols // QK_K
    first = ws[0]
    cdef int64_t rows = first.shape[0]
    if out.shape[1] != rows:
        raise ValueError(f"matvec_many_into: out must be float32[{tasks}, {rows}], got [{out.shape[0]}, {out.shape[1]}]")
    # scratch: the tasks' weight, row and output addresses (ws keeps the weights alive), their
    # row counts (1) and first rows (t), each task's Q8_K, each thread's partial sums
    cdef _Arena a
    _arena_open(&a, 8 * 6 * tasks + _q8k_bytes(tasks * cols, tasks) + 4 * threads * _scratch_floats())
    cdef const uint8_t **pv
    cdef const float **xr
    cdef float **op
    cdef int64_t *n
    cdef int64_t *first_row
    cdef int64_t *vec_ids
    cdef const uint8_t[:, ::1] wv
    cdef _Q8K q
    cdef float *acc
    try:
        pv = <const uint8_t **>_take(&a, 8 * tasks)
        xr = <const float **>_take(&a, 8 * tasks)
        op = <float **>_take(&a, 8 * tasks)
        n = <int64_t *>_take(&a, 8 * tasks)
        first_row = <int64_t *>_take(&a, 8 * tasks)
        vec_ids = <int64_t *>_take(&a, 8 * tasks)
        for t in range(tasks):
            wv = ws[t]
            if wv.shape[0] != rows or wv.shape[1] != nb * bb:
                raise ValueError(f"matvec_many_into: weight {t} is uint8[{wv.shape[0]}, {wv.shape[1]}], "
                                 f"expected [{rows}, {nb * bb}]")
            pv[t], xr[t], op[t], n[t], first_row[t], vec_ids[t] = &wv[0, 0], &x[t, 0], &out[t, 0], 1, t, t
        _q8k_take(&a, tasks * cols, tasks, &q)
        acc = <float *>_take(&a, 4 * threads * _scratch_floats())
        with nogil:  # (one row a task: never the AMX tiles, matvec_many_supported)
            _matmul_many_core(xr, pv, op, n, first_row, qtype, tasks, tasks, rows, cols, bb, q.qs, q.dq,
                              q.fb, acc, q.bad, vec_ids, tasks, NULL, 0, NULL, NULL, NULL, NULL, NULL, threads)
    finally:
        free(a.base)


def moe_decode_supported(int qtype_gu, int qtype_d):
    """Whether moe_decode_into handles experts of these types (gate/up, down) with the bits of
    matvec_many_into + SwiGLU + the weighted sum."""
    return matvec_many_supported(qtype_gu) and matvec_many_supported(qtype_d)


cdef int _moe_run(const float *h, const uint8_t **pv, int qgu, int qd, const float *weights,
                  int64_t k, int64_t E, int64_t ff, float *y, float *out, int threads,
                  float *gu = NULL, float *act = NULL) except -1:
    """The routed experts' work once the arguments are checked (moe_decode_into's docstring): pv
    holds the k gate, k up and k down matrices' addresses, in the order the sum takes them. The
    scratch comes from one arena: h's and the activation rows' Q8_K, gate/up outputs float[2k, ff]
    and SwiGLU float[k, ff] (unless the caller gives them: gu, act), each thread's partial sums."""
    cdef _Arena a
    # Q8_K of h (E values), then of each expert's activation row (ff each): 1 + k rows
    _arena_open(&a, _q8k_bytes(E + k * ff, 1 + k) + 4 * 3 * k * ff + 4 * threads * _scratch_floats())
    cdef _Q8K q
    cdef float *acc
    try:
        _q8k_take(&a, E + k * ff, 1 + k, &q)
        if gu == NULL:
            gu = <float *>_take(&a, 4 * 2 * k * ff)
        if act == NULL:
            act = <float *>_take(&a, 4 * k * ff)
        acc = <float *>_take(&a, 4 * threads * _scratch_floats())
        with nogil:
            _moe_decode_core(h, pv, qgu, pv + 2 * k, qd, weights, k, E, ff, q.qs, q.dq, q.fb, gu, act, y,
                             out, acc, q.bad, threads)
    finally:
        free(a.base)
    return 0


cdef _check_moe_call(str who, int qtype_gu, int qtype_d, int64_t E, int64_t k, h, y, out, int threads):
    """The checks moe_decode_into and moe_route_decode_into share (types, threads, the shapes of
    h: [1, E], y: [k, E], out: [1, E])."""
    if not moe_decode_supported(qtype_gu, qtype_d):
        raise ValueError(f"{who}: types {_TYPE_NAMES.get(qtype_gu, qtype_gu)} / "
                         f"{_TYPE_NAMES.get(qtype_d, qtype_d)} are not supported")
    if threads < 1:
        raise ValueError(f"{who}: threads must be >= 1, got {threads}")
    if h.shape[0] != 1 or out.shape[0] != 1 or out.shape[1] != E or y.shape[0] != k or y.shape[1] != E:
        raise ValueError(f"{who}: h [{h.shape[0]}, {E}], out [{out.shape[0]}, {out.shape[1]}], "
                         f"y [{y.shape[0]}, {y.shape[1]}]: need [1, E], [1, E], [k = {k}, E]")
    if E % QK_K:
        raise ValueError(f"{who}: width {E} must be a multiple of {QK_K}")


def moe_decode_into(const float[:, ::1] h, list gates, list ups, list downs, int qtype_gu, int qtype_d,
                    const float[::1] weights, float[:, ::1] y, float[:, ::1] out, int threads=1):
    """A decode step's routed experts in one call and one parallel region: for each expert t
    (in the order given) ``y[t] = down_t(silu(gate_t h) * up_t h)``, then
    ``out[0] = sum over t, in order, of y[t] * weights[t]`` (each product rounded, then added:
    NumPy's ``out += y * w``). The bits equal matvec_many_into for the gate/up rows, SwiGLU,
    matvec_many_into for the down rows and that sum, the per-expert path of
    engine/model/forward.py; no Python runs between the experts.

    h: float32[1, E]; gates, ups: k weights uint8[ff, row_bytes(E)] of qtype_gu; downs: k of
    uint8[E, row_bytes(ff)] of qtype_d (C-contiguous); weights: float32[k]; y: float32[k, E]
    (scratch: the experts' outputs times their weights on return); out: float32[1, E]."""
    cdef int64_t k = len(gates)
    if len(ups) != k or len(downs) != k or weights.shape[0] != k:
        raise ValueError(f"moe_decode_into: {k} gates, {len(ups)} ups, {len(downs)} downs, "
                         f"{weights.shape[0]} weights: all must agree")
    cdef int64_t E = h.shape[1]
    _check_moe_call("moe_decode_into", qtype_gu, qtype_d, E, k, h, y, out, threads)
    if k == 0:
        out[:, :] = 0
        return
    cdef int64_t ff = gates[0].shape[0]
    if ff % QK_K:
        raise ValueError(f"moe_decode_into: width {ff} must be a multiple of {QK_K}")
    cdef int64_t nbe = E // QK_K, nbf = ff // QK_K
    expected = {"gate": (ff, nbe * BLOCK_BYTES[qtype_gu]), "up": (ff, nbe * BLOCK_BYTES[qtype_gu]),
                "down": (E, nbf * BLOCK_BYTES[qtype_d])}
    cdef const uint8_t[:, ::1] wv
    # the weights' addresses (gates, ups, downs; the lists keep them alive)
    cdef const uint8_t **pv = <const uint8_t **>malloc(8 * 3 * k)
    if pv == NULL:
        raise MemoryError("moe_decode_into: the experts' addresses")
    try:
        for t, (role, w) in enumerate([("gate", g) for g in gates] + [("up", u) for u in ups]
                                      + [("down", d) for d in downs]):
            wv = w
            if (wv.shape[0], wv.shape[1]) != expected[role]:
                raise ValueError(f"moe_decode_into: {role} {t % k} is uint8[{wv.shape[0]}, {wv.shape[1]}], "
                                 f"expected {list(expected[role])}")
            pv[t] = &wv[0, 0]
        _moe_run(&h[0, 0], pv, qtype_gu, qtype_d, &weights[0], k, E, ff, &y[0, 0], &out[0, 0], threads)
    finally:
        free(pv)


def ffn_decode_supported(int qtype_gu, int qtype_down):
    """True where ffn_decode_into runs (the types moe_decode_into takes)."""
    return moe_decode_supported(qtype_gu, qtype_down)


def ffn_decode_into(const float[:, ::1] h, const uint8_t[:, ::1] w_gu, int qtype_gu,
                    const uint8_t[:, ::1] w_down, int qtype_down, float[:, ::1] gu,
                    float[:, ::1] act, float[:, ::1] out, int threads):
    """One token's SwiGLU feed-forward in one call (_legacy.ffn_decode_into's contract): gu =
    h @ W_gu.T (w_gu: the ff gate rows, then the ff up rows), act = silu(gate) * up, out = act @
    W_down.T; h, out: float32[1, E], gu: [1, 2 ff], act: [1, ff]. moe_decode_into's region with
    one expert of weight 1 (gate and up at their rows of w_gu): the bits of matmul_into on
    each matrix, _ops.swiglu_into between them (out = 0 + 1 * y: y's value)."""
    cdef int64_t E = h.shape[1], ff = act.shape[1]
    _check_moe_call("ffn_decode_into", qtype_gu, qtype_down, E, 1, h, out, out, threads)
    if ff % QK_K:
        raise ValueError(f"ffn_decode_into: width {ff} must be a multiple of {QK_K}")
    cdef int64_t bgu = E // QK_K * BLOCK_BYTES[qtype_gu], bd = ff // QK_K * BLOCK_BYTES[qtype_down]
    if not (w_gu.shape[0] == 2 * ff and w_gu.shape[1] == bgu and w_down.shape[0] == E
            and w_down.shape[1] == bd and act.shape[0] == 1 and gu.shape[0] == 1 and gu.shape[1] == 2 * ff):
        raise ValueError(f"ffn_decode_into: w_gu uint8[{w_gu.shape[0]}, {w_gu.shape[1]}], w_down "
                         f"uint8[{w_down.shape[0]}, {w_down.shape[1]}], gu [{gu.shape[0]}, {gu.shape[1]}], "
                         f"act [{act.shape[0]}, {act.shape[1]}]: expected [{2 * ff}, {bgu}], [{E}, {bd}], "
                         f"[1, {2 * ff}], [1, {ff}]")
    cdef const uint8_t *pv[3]
    pv[0] = &w_gu[0, 0]
    pv[1] = &w_gu[ff, 0]
    pv[2] = &w_down[0, 0]
    cdef float one = 1.0
    y = np.empty((1, E), np.float32)   # the expert's output before its weight (out may not be it)
    cdef float[:, ::1] yv = y
    _moe_run(&h[0, 0], pv, qtype_gu, qtype_down, &one, 1, E, ff, &yv[0, 0], &out[0, 0], threads,
             &gu[0, 0], &act[0, 0])


def moe_route_decode_into(const float[:, ::1] h, const float[:, ::1] router, const uint8_t[:, ::1] gates,
                          const uint8_t[:, ::1] ups, const uint8_t[:, ::1] downs, int qtype_gu, int qtype_d,
                          bint norm_topk, float[:, ::1] probs, int64_t[:, ::1] ids, float[:, ::1] weights,
                          float[:, ::1] y, float[:, ::1] out, int threads=1):
    """A decode step's whole routed-expert block for experts held in memory, router included, in
    one call (no Python between the router and the experts): the router's logits (F32 weights,
    through the row dot _legacy's float matmul uses: the same bits), softmax, the top k and their
    weights (the row functions of _ops.softmax_rows_into and topk_weights_into), then
    moe_decode_into's work on those experts taken in ascending id (the order Model.moe sums in).

    h: float32[1, E]; router: float32[X, E]; gates, ups: uint8[X, ff * row_bytes(E)] of qtype_gu,
    downs: uint8[X, E * row_bytes(ff)] of qtype_d (a layer's stacked expert tensors, one expert a
    row); norm_topk: the weights divided by their sum. Out: probs float32[1, X] (the router's
    probabilities), ids int64[1, k] and weights float32[1, k] (the choice, highest weight first,
    as Model.route returns it), y float32[k, E] (scratch), out float32[1, E] (the weighted sum)."""
    cdef int64_t X = router.shape[0], E = h.shape[1], k = ids.shape[1]
    _check_moe_call("moe_route_decode_into", qtype_gu, qtype_d, E, k, h, y, out, threads)
    if router.shape[1] != E or probs.shape[0] != 1 or probs.shape[1] != X or ids.shape[0] != 1 \
            or weights.shape[0] != 1 or weights.shape[1] != k or not 1 <= k <= X:
        raise ValueError(f"moe_route_decode_into: router [{X}, {router.shape[1]}], probs [{probs.shape[0]}, "
                         f"{probs.shape[1]}], ids [{ids.shape[0]}, {k}], weights [{weights.shape[0]}, "
                         f"{weights.shape[1]}] for h [1, {E}]: need [X, E], [1, X], [1, k], [1, k], 1 <= k <= X")
    cdef int64_t bgu = (E // QK_K) * BLOCK_BYTES[qtype_gu]   # bytes of one gate / up row
    cdef int64_t ff = gates.shape[1] // bgu
    if gates.shape[0] != X or ups.shape[0] != X or downs.shape[0] != X or ff == 0 or ff % QK_K \
            or gates.shape[1] != ff * bgu or ups.shape[1] != gates.shape[1] \
            or downs.shape[1] != E * (ff // QK_K) * BLOCK_BYTES[qtype_d]:
        raise ValueError(f"moe_route_decode_into: stacked experts gate uint8[{gates.shape[0]}, {gates.shape[1]}], "
                         f"up [{ups.shape[0]}, {ups.shape[1]}], down [{downs.shape[0]}, {downs.shape[1]}] do not "
                         f"hold {X} experts of [ff, {E}] / [{E}, ff] rows ({bgu} bytes a gate row)")
    cdef const uint8_t **pv = <const uint8_t **>malloc(8 * 3 * k + 4 * k)
    if pv == NULL:
        raise MemoryError("moe_route_decode_into: the experts' addresses")
    cdef float *used_w = <float *>(pv + 3 * k)   # the weights in ascending id
    try:
        with nogil:
            _route(&h[0, 0], &router[0, 0], X, E, k, norm_topk, &gates[0, 0], &ups[0, 0], &downs[0, 0],
                   gates.shape[1], downs.shape[1], &probs[0, 0], &ids[0, 0], &weights[0, 0], pv, used_w, threads)
        _moe_run(&h[0, 0], pv, qtype_gu, qtype_d, used_w, k, E, ff, &y[0, 0], &out[0, 0], threads)
    finally:
        free(pv)


cdef void _route(const float *h, const float *router, int64_t X, int64_t E, int64_t k, bint norm_topk,
                 const uint8_t *gates, const uint8_t *ups, const uint8_t *downs, int64_t gu_bytes,
                 int64_t d_bytes, float *probs, int64_t *ids, float *weights, const uint8_t **pv,
                 float *used_w, int threads) noexcept nogil:
    """A decode step's router (moe_route_decode_into, decode_layers_into): probs[X] = softmax of
    router[X, E] h, the top k in ids / weights (highest weight first), and the chosen experts'
    gate, up and down addresses in pv (k each: X experts of gu_bytes, gu_bytes, d_bytes at
    gates / ups / downs) with their weights in used_w, in ascending id (the order of the sum)."""
    cdef int64_t r, j, t
    for r in prange(X, num_threads=threads, schedule="guided"):
        ws_fdot(WS_F32, 1, <const uint8_t *>(router + r * E), <int>E, h, E, probs + r, 1)
    ws_softmax_row(probs, X, probs)
    ws_topk_weights_row(probs, X, k, True, norm_topk, ids, weights)
    for j in range(k):  # slot t of pick j: its rank by id (the ids are distinct; k is small)
        t = 0
        for r in range(k):
            if ids[r] < ids[j]:
                t = t + 1
        pv[t] = gates + ids[j] * gu_bytes
        pv[k + t] = ups + ids[j] * gu_bytes
        pv[2 * k + t] = downs + ids[j] * d_bytes
        used_w[t] = weights[j]


include "_decode_layers.pxi"
