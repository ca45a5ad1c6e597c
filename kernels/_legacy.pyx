# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Fused dequantize-matmul for the legacy 32-element block types and the float types.

``matmul_into(x, w, qtype, out, threads)``: ``out[n, rows] = x[n, cols] @ W.T`` where ``W`` is
``rows`` GGUF rows of ``qtype`` blocks (``w``: uint8[rows, row_bytes]). Public and checked;
everything below it trusts its arguments. ``ffn_decode_into``: one token's SwiGLU feed-forward
(gate/up, SwiGLU, down) in one parallel region, with the bits of those three calls.

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
* Decode (n <= 4): unpack and multiply in one pass over the weights. With an even number of
  blocks per row (``lg_stream_rows``), a chunk of 16 rows is read as one stream of blocks: one
  gather of scales per 16 blocks wherever rows begin, pairs of blocks unpacked into natural
  element order (activations quantized in that order for this path), rows' lanes summed 16
  rows at a time; else row by row (``lg_dot_tile``). Prefill: each thread
  unpacks a chunk of weight rows once into an L2 scratch (u8 per weight + float scales) and
  multiplies every 4-row tile of activations against it.
* Prefill on AMX-INT8 (``AMX``: built for it and Linux granted the tile state; n >= the cut-off
  of ``_amx_tuning``): activations repacked per 16 rows into the tiles' VNNI layout, each thread
  unpacks 16 weight rows at a time, one K = 32 tile product per block, scaled in AVX-512 floats
  (``legacy_amx.h``). Offset types there use signed weights (tdpbssd), folding the offset into
  the exact int32 dot instead of a float term.
* Outside the decode stream, inside a 32-byte block the nibble types keep byte order "element k,
  element 16 + k" (what widening the packed bytes to 16 bits gives); the activations are stored
  in that order.
* AVX2 (``AVX2``: built with AVX2 + FMA + F16C, no AVX-512; Zen 3, Haswell .. Alder Lake): the
  same quantities 8 lanes wide, as llama.cpp's AVX2 vec_dot: ``vpmaddubsw`` (u8 x s8 -> int16
  pairs) then ``vpmaddwd`` by ones (-> int32). The nibble types unpack a pair of blocks into one
  register (low nibbles: elements 0..15 of both, high: 16..31; activations stored in that order,
  ``LG_SPLIT``) and add the two halves' int16 sums before widening (at most 15748: no
  saturation). Q8_0 stays signed (``vpsignb``: |w| times x with w's sign; q + 128 would saturate
  the int16 pairs), with no offset term. Scales of 8 blocks: 8 32-bit loads and a tree of unpacks
  (Zen 3's ``vpgatherdd`` measured slower; a gather only for fewer than 8). Decode (n <= 4) with
  an even number of blocks per row: the same 16-row stream, 8 blocks at a time, activations in
  ``LG_SPLIT`` order (a pair never straddles rows); an odd number row by row (``lg_dot_tile``);
  prefill from the unpacked scratch as above.

Float weights (F32, F16, BF16): float32 FMA (16 lanes on AVX-512, 8 on AVX2), F16 via ``vcvtph2ps``,
BF16 by a 16-bit shift.

Non-finite values (docs/DESIGN.md, kernels): an activation row holding a NaN or Inf gives an all-NaN
output row (the quantizer flags the row; ``ws_nan_rows`` overwrites its outputs afterwards), as the
float reference does; a NaN weight scale (d, m) reaches the float products, an Inf one is made NaN
where it is loaded (``ws_inf_to_nan``: the reference's 0 * Inf is NaN). The float types propagate
both through their float32 products.

Each output element is computed by one thread in a fixed order, so any thread count gives the
same bits. Without AVX-512 (F, BW, VL, VNNI) + F16C + BMI2 at compile time, the AVX2 kernels
(with AVX2 + FMA + F16C), else portable scalar C, compute the same quantities (same activation
quants, same per-block integer dots; only the order of the float sums differs).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int64_t, uint8_t
from libc.stddef cimport size_t

from gguf import GGMLQuantizationType as _T

from . import traits

# the C kernels (kernels/csrc/legacy.h)
cdef extern from "legacy.h":
    int ws_block_elements(int t) noexcept nogil
    int ws_block_bytes(int t) noexcept nogil
    int lg_simd() noexcept nogil
    int lg_avx2() noexcept nogil
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
        int stream
        const float *dxr
        const float *csr
        size_t rs
        float *fscratch
        size_t fscratch_floats
    enum: LG_NATURAL, LG_INTER, LG_SPLIT
    int lg_order(int t) noexcept nogil
    int lg_stream_order(int t) noexcept nogil
    int lg_quantize_row(int t, const float *x, int nb, int nbp, int8_t *xq, float *dx, float *cs,
                        int order) noexcept nogil
    void lg_tile_scales(int t, const float *dx, const float *cs, size_t fs, int n, int nb, size_t rs,
                        float *dxr, float *csr) noexcept nogil
    void ws_nan_rows(const uint8_t *bad, int64_t n, float *out, int64_t rows, int64_t ostride) noexcept nogil
    void lg_chunk(const lg_ctx *c, int r0, int r1, int tid) noexcept nogil
    void *lg_alloc(size_t nbytes) noexcept nogil
    void ws_omp_barrier() noexcept nogil

cdef extern from "ops_simd.h":
    void ws_swiglu_row(const float *gate, const float *up, int64_t m, float *out) noexcept nogil

# AMX tiles for prefill (kernels/csrc/legacy_amx.h, built on legacy.h's helpers)
cdef extern from "legacy_amx.h" nogil:
    int LG_AMX_BLK
    int lg_amx_built()
    int lg_amx_request()
    void lg_amx_pack_act(const int8_t *xq, const float *dx, const float *cs, size_t xs, size_t fs,
                         int n, int nb, int r0, uint8_t *dst)
    void lg_amx_group(int t, const uint8_t *w, size_t row_bytes, int nb, int i0, int nrw,
                      const uint8_t *xact, int g0, int g1, int n, float *out, size_t ostride,
                      uint8_t *scr)

from libc.stdlib cimport free

# gguf type value -> (elements per block, bytes per block), for the types of kernels/traits.py
cdef dict _BLOCKS = {int(q): (ws_block_elements(q), ws_block_bytes(q))
                     for q in traits.types_on("cython", traits.LEGACY, traits.FLOAT)}

SUPPORTED = frozenset(_BLOCKS)
SIMD = bool(lg_simd())   # True when built with the AVX-512 VNNI kernels
AVX2 = bool(lg_avx2())   # True when built with the AVX2 kernels instead (no AVX-512); neither: scalar C

# n <= FUSED_MAX_N: unpack while multiplying (decode); above: unpack a chunk of rows once
cdef enum:
    FUSED_MAX_N = 4
# the decode kernels that unpack while multiplying are built (AVX-512 or AVX2)
cdef bint _FUSED_BUILT = lg_simd() or lg_avx2()
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


cdef void _ctx_init(lg_ctx *c, int qtype, int n, int rows, int cols, bint quant, const uint8_t *w,
                    size_t row_bytes, const float *x, float *out, bint amx) noexcept nogil:
    """c's fields for out[n, rows] = x[n, cols] @ W.T (W: `rows` rows of row_bytes at w; x and out
    C-contiguous), no buffers yet (NULL). amx: the call takes the AMX prefill path."""
    c.t = qtype
    c.n = n
    c.rows = rows
    c.cols = cols
    c.nb = cols // 32 if quant else 0
    c.nbp = (c.nb + 15) // 16 * 16
    # decode unpacks while multiplying: AVX-512 and AVX2 (the scalar lg_dot_tile reads unpacked
    # rows, so a portable build takes the unpack-into-scratch path at every n; it read NULL before)
    c.fused = n <= FUSED_MAX_N and _FUSED_BUILT
    c.w = w
    c.w_stride = row_bytes
    c.x = x
    c.x_stride = <size_t>cols
    c.out = out
    c.o_stride = <size_t>rows
    c.xs = 32 * <size_t>c.nbp
    c.fs = <size_t>c.nbp
    c.scratch = NULL
    c.scratch_bytes = 0
    # decode with an even number of blocks per row: the block-stream kernel (lg_stream_rows),
    # activations in lg_stream_order
    c.stream = c.fused and quant and c.nb % 2 == 0 and not amx
    c.dxr = NULL
    c.csr = NULL
    c.rs = 0
    c.fscratch = NULL
    c.fscratch_floats = 0
    c.xq = NULL
    c.dx = NULL
    c.cs = NULL
    c.wb = 16


cdef size_t _stream_floats(lg_ctx *c, int nthreads) noexcept nogil:
    """Floats of the decode stream's buffer for c (dxr, csr: [n][rs], then per thread
    [n][rs + 256] of scratch); sets c.rs and c.fscratch_floats."""
    c.rs = <size_t>c.wb * c.nb + 16
    c.fscratch_floats = <size_t>c.n * (c.rs + 256)
    return 2 * <size_t>c.n * c.rs + nthreads * c.fscratch_floats


cdef inline int _act_order(const lg_ctx *c) noexcept nogil:
    """The byte order c's kernels read the activation quants in."""
    return lg_stream_order(c.t) if c.stream else lg_order(c.t)


cdef uint8_t _quantize_decode_row(lg_ctx *c, float *stream) noexcept nogil:
    """c's one activation row quantized into c.xq / c.dx / c.cs (as matmul_into does for n = 1),
    then, for the decode stream, its pointers into `stream` and the tiled scales; 1 where the
    row holds a NaN or Inf."""
    cdef uint8_t bad = lg_quantize_row(c.t, c.x, c.nb, c.nbp, <int8_t *>c.xq, <float *>c.dx,
                                       <float *>c.cs, _act_order(c)) != 0
    if c.stream:
        _stream_setup(c, stream)
    return bad


cdef void _stream_setup(lg_ctx *c, float *stream) noexcept nogil:
    """c's decode-stream pointers into `stream` (_stream_floats of them), and the activations'
    scales tiled along a chunk (after the activations are quantized)."""
    c.dxr = stream
    c.csr = stream + <size_t>c.n * c.rs
    c.fscratch = stream + 2 * <size_t>c.n * c.rs
    lg_tile_scales(c.t, c.dx, c.cs, c.fs, c.n, c.nb, c.rs, stream, stream + <size_t>c.n * c.rs)


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
        lg_quantize_row(qtype, &x[i, 0], nb, nbp, &xq[i, 0], &d[i, 0], &cs[i, 0], lg_order(qtype))
    qs = xq_a.reshape(n, nbp, 32)
    if lg_order(qtype) == LG_INTER:     # stored as (element k, element 16 + k) pairs
        qs = np.concatenate([qs[:, :, 0::2], qs[:, :, 1::2]], axis=2)
    elif lg_order(qtype) == LG_SPLIT:   # per pair of blocks: [half][block][16]
        qs = qs.reshape(n, nbp // 2, 2, 2, 16).transpose(0, 1, 3, 2, 4).reshape(n, nbp, 32)
    return np.ascontiguousarray(qs[:, :nb]).reshape(n, cols), d_a[:, :nb].copy(), cs_a[:, :nb].copy()


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
    cdef int tid, order, nthreads = threads
    cdef bint quant = elements == 32
    cdef bint amx = AMX and quant and n >= _AMX_MIN_N   # prefill on the tiles (quantized types)
    _ctx_init(&c, qtype, <int>n, <int>rows, <int>cols, quant, &w[0, 0], <size_t>rb, &x[0, 0], &out[0, 0], amx)

    cdef int8_t *xq = NULL
    cdef float *fbuf = NULL
    cdef uint8_t *scratch = NULL
    cdef uint8_t *bad = NULL     # uint8[n]: activation row i holds a NaN / Inf (ws_nan_rows)
    cdef float *stream = NULL    # decode stream: dxr, csr [n][rs], then per thread [n][rs + 256]
    try:
        if quant:
            xq = <int8_t *>lg_alloc(<size_t>n * c.xs)
            fbuf = <float *>lg_alloc(2 * <size_t>n * c.fs * sizeof(float))
            bad = <uint8_t *>lg_alloc(<size_t>n)
            if xq == NULL or fbuf == NULL or bad == NULL:
                raise MemoryError()
            c.xq = xq
            c.dx = fbuf
            c.cs = fbuf + <size_t>n * c.fs
            order = _act_order(&c)
            if n == 1:   # decode: no parallel region (its start costs more than the row)
                with nogil:
                    bad[0] = lg_quantize_row(c.t, &x[0, 0], c.nb, c.nbp, xq, fbuf, fbuf + c.fs, order) != 0
            else:
                for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
                    bad[i] = lg_quantize_row(c.t, &x[i, 0], c.nb, c.nbp, xq + <size_t>i * c.xs,
                                             fbuf + <size_t>i * c.fs, fbuf + (<size_t>n + i) * c.fs, order) != 0
            if c.stream:
                stream = <float *>lg_alloc(_stream_floats(&c, nthreads) * sizeof(float))
                if stream == NULL:
                    raise MemoryError()
                _stream_setup(&c, stream)
            if amx:
                scratch = <uint8_t *>lg_alloc(<size_t>((n + 15) // 16 + nthreads) * c.nb * LG_AMX_BLK)
                if scratch == NULL:
                    raise MemoryError()
                with nogil:
                    _matmul_amx(&c, scratch + <size_t>nthreads * c.nb * LG_AMX_BLK, scratch, nthreads)
                    ws_nan_rows(bad, n, &out[0, 0], rows, rows)
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
            if nthreads == 1 or nchunks == 1:   # no parallel region for one thread's work
                for chunk in range(nchunks):
                    lg_chunk(&c, <int>(chunk * crow), <int>((chunk + 1) * crow), 0)
            else:
                for chunk in prange(nchunks, num_threads=nthreads, schedule="static"):
                    tid = threadid()
                    lg_chunk(&c, <int>(chunk * crow), <int>((chunk + 1) * crow), tid)
            if quant:
                ws_nan_rows(bad, n, &out[0, 0], rows, rows)
    finally:
        free(xq)
        free(fbuf)
        free(scratch)
        free(bad)
        free(stream)


def ffn_decode_supported(int qtype_gu, int qtype_down):
    """True where ffn_decode_into runs: both types 32-element quantized ones of this module and
    the decode kernels built (AVX-512 or AVX2)."""
    return (_FUSED_BUILT and qtype_gu in _BLOCKS and qtype_down in _BLOCKS
            and _BLOCKS[qtype_gu][0] == 32 and _BLOCKS[qtype_down][0] == 32)


def ffn_decode_into(const float[:, ::1] h, const uint8_t[:, ::1] w_gu, int qtype_gu,
                    const uint8_t[:, ::1] w_down, int qtype_down, float[:, ::1] gu,
                    float[:, ::1] act, float[:, ::1] out, int threads):
    """One token's SwiGLU feed-forward in one parallel region: gu = h @ W_gu.T (W_gu: the ff gate
    rows, then the ff up rows), act = silu(gate) * up, out = act @ W_down.T. h, out:
    float32[1, E]; w_gu: 2 ff rows of E columns; w_down: E rows of ff columns; gu: [1, 2 ff]; act:
    [1, ff]. The activation quantization, 16-row chunks and kernels of matmul_into on each matrix
    and _ops.swiglu_into's row function, so the bits of those three calls; one region (threads
    wait at barriers between the steps) instead of three calls and their Python. A NaN / Inf in
    h or act gives NaN outputs as matmul_into's do. ValueError where ffn_decode_supported is
    False or the shapes disagree."""
    if not ffn_decode_supported(qtype_gu, qtype_down):
        raise ValueError(f"ffn_decode_into: types {qtype_gu}, {qtype_down} are not both 32-element quantized "
                         f"types with the decode kernels built")
    if threads < 1:
        raise ValueError(f"ffn_decode_into: threads must be >= 1, got {threads}")
    cdef Py_ssize_t E = h.shape[1], ff = act.shape[1]
    cdef Py_ssize_t bgu = _BLOCKS[qtype_gu][1], bd = _BLOCKS[qtype_down][1]
    if not (h.shape[0] == 1 and act.shape[0] == 1 and gu.shape[0] == 1 and out.shape[0] == 1
            and E % 32 == 0 and ff % 32 == 0 and w_gu.shape[0] == 2 * ff and w_gu.shape[1] == E // 32 * bgu
            and w_down.shape[0] == E and w_down.shape[1] == ff // 32 * bd
            and gu.shape[1] == 2 * ff and out.shape[1] == E):
        raise ValueError(f"ffn_decode_into: h {tuple(h.shape)[:2]}, w_gu {tuple(w_gu.shape)[:2]}, w_down "
                         f"{tuple(w_down.shape)[:2]}, gu {tuple(gu.shape)[:2]}, act {tuple(act.shape)[:2]}, "
                         f"out {tuple(out.shape)[:2]} do not fit one token's feed-forward")
    if E == 0 or ff == 0 or E >= 2**30 or ff >= 2**30:
        raise ValueError(f"ffn_decode_into: E = {E}, ff = {ff} must be in [32, 2**30)")
    cdef int nthreads = threads
    cdef lg_ctx cg, cd   # gate/up, down
    _ctx_init(&cg, qtype_gu, 1, <int>(2 * ff), <int>E, True, &w_gu[0, 0], <size_t>w_gu.shape[1], &h[0, 0], &gu[0, 0], False)
    _ctx_init(&cd, qtype_down, 1, <int>E, <int>ff, True, &w_down[0, 0], <size_t>w_down.shape[1], &act[0, 0], &out[0, 0], False)
    cdef size_t sg = _stream_floats(&cg, nthreads) if cg.stream else 0
    cdef size_t sd = _stream_floats(&cd, nthreads) if cd.stream else 0
    # one buffer: each matrix's activation quants, then their dx / cs, then their decode streams
    cdef size_t fl = 2 * (cg.fs + cd.fs) + sg + sd
    cdef uint8_t *buf = <uint8_t *>lg_alloc(cg.xs + cd.xs + fl * sizeof(float))
    if buf == NULL:
        raise MemoryError()
    cdef float *f = <float *>(buf + cg.xs + cd.xs)
    cg.xq = <int8_t *>buf
    cd.xq = <int8_t *>(buf + cg.xs)
    cg.dx, cg.cs = f, f + cg.fs
    cd.dx, cd.cs = f + 2 * cg.fs, f + 2 * cg.fs + cd.fs
    cdef float *streams = f + 2 * (cg.fs + cd.fs)
    cdef uint8_t bad[2]   # h, act hold a NaN / Inf
    cdef int ng = <int>((2 * ff + cg.wb - 1) // cg.wb), nd = <int>((E + cd.wb - 1) // cd.wb)   # row chunks
    cdef int i, chunk
    try:
        with nogil, parallel(num_threads=nthreads):
            for i in prange(1, schedule="static"):   # one thread: h's quants
                bad[0] = _quantize_decode_row(&cg, streams)
            ws_omp_barrier()   # every gate / up row reads h's quants
            for chunk in prange(ng, schedule="static"):
                lg_chunk(&cg, chunk * cg.wb, (chunk + 1) * cg.wb, threadid())
            ws_omp_barrier()   # SwiGLU reads every gate and up row
            for i in prange(1, schedule="static"):   # one thread: SwiGLU, then act's quants
                ws_nan_rows(bad, 1, cg.out, 2 * ff, 2 * ff)
                ws_swiglu_row(cg.out, cg.out + ff, ff, &act[0, 0])
                bad[1] = _quantize_decode_row(&cd, streams + sg)
            ws_omp_barrier()   # the down rows read act's quants
            for chunk in prange(nd, schedule="static"):
                lg_chunk(&cd, chunk * cd.wb, (chunk + 1) * cd.wb, threadid())
        ws_nan_rows(bad + 1, 1, &out[0, 0], E, E)
    finally:
        free(buf)
