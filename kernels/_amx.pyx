# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""k-quant matrix-matrix products on AMX-BF16 tiles (prefill), nogil, OpenMP.

``matmul_into(x, w, qtype, out, threads)`` computes ``out[n, rows] = x[n, cols] @ W.T`` for W in
Q2_K..Q6_K blocks when the CPU has AMX-BF16 (Intel Sapphire Rapids and later) and Linux grants the
tile state (``AVAILABLE``); ``SUPPORTED`` is empty otherwise, so the backend registry offers it
nowhere else. kernels/csrc/amx_bf16.h holds the math and the layouts.

Why a second AMX path: on this project's Qwen3.5-35B-shaped prefill the Q4_K projections took
10 of 17 s of a 512-token prompt through NumPy (expand to float32, then BLAS sgemm), since the
int8 kernels' vector path is no faster there and int8 tiles fit only Q2_K's scaled codes.

Work: every activation row rounded to bf16 and packed once per call (groups of 16 rows, in
parallel); then, per chunk of activation groups whose packed bytes fit ``_ACT_L2``, the weight
rows in tasks of 32 over the threads: a task expands its rows to bf16 (in its thread's scratch,
L2) and multiplies them against the chunk on the tiles. Each output is made by one thread, in a
fixed order: the thread count does not change results.

Numerics: weights and activations rounded to bf16, products summed in float32 (not the Q8_K
path of the int8 kernels); NaN / Inf propagate as float arithmetic does.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t

cimport openmp
from libc.stdlib cimport free
cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

from gguf import GGMLQuantizationType

from . import traits

include "matmul_args.pxi"

cdef extern from "common.h" nogil:
    enum:
        WS_Q2_K
        WS_QK_K
    int ws_block_bytes(int qtype)

cdef extern from "amx_bf16.h" nogil:
    int WS_AMX_BF16
    int WS_AB_TASK
    int64_t ws_ab_act_bytes(int64_t n, int64_t cols)
    int ws_ab_request()
    void ws_ab_pack_act(const float *x, int64_t n, int64_t cols, int64_t g, int permuted, uint8_t *dst)
    void ws_ab_expand(int qtype, const uint8_t *w, int64_t row_bytes, int64_t nb, int nrw, uint8_t *a)
    void ws_ab_task(const uint8_t *a, int64_t cols, const uint8_t *xact, int64_t g0, int64_t g1,
                    int64_t n, int nrw, float *out, int64_t ostride, int64_t i0, float *cbuf)

# compiled for AMX-BF16 and the tile state granted (once per process)
AVAILABLE = bool(WS_AMX_BF16) and bool(ws_ab_request())
SUPPORTED = frozenset(int(q) for q in traits.types_in(traits.K_QUANT)) if AVAILABLE else frozenset()

# L2 bytes for the packed activations one expansion of a task's weight rows serves
cdef int64_t _ACT_L2 = 1 << 20


def _tuning(act_l2=None):
    """Set / read _ACT_L2 (for tests and benchmarks): the packed activation bytes a chunk holds."""
    global _ACT_L2
    if act_l2 is not None:
        _ACT_L2 = max(1, int(act_l2))
    return _ACT_L2


cdef void _matmul_core(const float *x, const uint8_t *w, int qtype, float *out, int64_t n,
                       int64_t rows, int64_t cols, uint8_t *xact, uint8_t *scratch, float *cbuf,
                       int threads) noexcept nogil:
    cdef int64_t nb = cols // WS_QK_K, bb = ws_block_bytes(qtype)
    cdef int64_t steps = cols // 32
    cdef int64_t ngx = ((n + 31) // 32) * 2          # activation groups, an even count
    cdef int64_t tasks = (rows + WS_AB_TASK - 1) // WS_AB_TASK
    # activation groups a chunk holds: an even count whose packed bytes fit _ACT_L2
    cdef int64_t per = max(<int64_t>2, (_ACT_L2 // (steps * 1024)) // 2 * 2)
    cdef int64_t nch = (ngx + per - 1) // per
    cdef int64_t g, c, g0, g1, j, t, i0
    per = ((ngx + nch - 1) // nch + 1) // 2 * 2     # balanced chunks, still even
    for g in prange(ngx, num_threads=threads, schedule="static"):
        ws_ab_pack_act(x, n, cols, g, qtype == WS_Q2_K, xact + g * steps * 1024)
    for c in range(nch):
        g0 = c * per
        g1 = min(g0 + per, ngx)
        for j in prange(tasks, num_threads=threads, schedule="static"):
            t = openmp.omp_get_thread_num()
            i0 = j * WS_AB_TASK
            ws_ab_expand(qtype, w + i0 * nb * bb, nb * bb, nb, <int>min(<int64_t>WS_AB_TASK, rows - i0),
                         scratch + t * WS_AB_TASK * 2 * cols)
            ws_ab_task(scratch + t * WS_AB_TASK * 2 * cols, cols, xact, g0, g1, n,
                       <int>min(<int64_t>WS_AB_TASK, rows - i0), out, rows, i0, cbuf + t * 1024)


def matmul_into(const float[:, ::1] x, const uint8_t[:, ::1] w, int qtype, float[:, ::1] out,
                int threads=1):
    """out[n, rows] = x[n, cols] @ W.T, W: uint8[rows, row_bytes] of qtype (one of SUPPORTED)."""
    if qtype not in SUPPORTED:
        raise ValueError(f"_amx.matmul_into: GGML type {qtype} not supported here"
                         + ("" if AVAILABLE else " (no AMX-BF16 on this CPU or build)"))
    if threads < 1:
        raise ValueError(f"_amx.matmul_into: threads must be >= 1, got {threads}")
    cdef int64_t n = x.shape[0], cols = x.shape[1], rows = w.shape[0]
    _check_matmul_args("_amx.matmul_into", GGMLQuantizationType(qtype).name, n, cols, rows, w.shape[1],
                       ws_block_bytes(qtype), out.shape[0], out.shape[1])
    if n == 0 or rows == 0:
        return
    if cols == 0:
        out[:, :] = 0
        return
    # packed activations (ws_ab_act_bytes), per thread: expanded rows bf16[32][cols], results float[4][256]
    cdef size_t act = ws_ab_act_bytes(n, cols)
    cdef size_t per_thread = WS_AB_TASK * 2 * cols
    cdef uint8_t *base = <uint8_t *>aligned_alloc(64, act + threads * per_thread + threads * 4096)
    if base == NULL:
        raise MemoryError(f"_amx.matmul_into: scratch of {act + threads * (per_thread + 4096)} bytes")
    try:
        with nogil:
            _matmul_core(&x[0, 0], &w[0, 0], qtype, &out[0, 0], n, rows, cols, base,
                         base + act, <float *>(base + act + threads * per_thread), threads)
    finally:
        free(base)
