# A decode step's layers in one native call (included by _kquants.pyx, whose _matmul_core,
# _route and _moe_decode_core it runs). Per layer, engine/model/forward.py's decode path makes
# ~45 Python calls around its kernels (norms, the QKV and output projections, the attention call,
# the router and experts, the residual adds, the non-finite check): ~3.5 ms of a 30B-A3B step on
# 2 Zen 4 threads, during which the second thread waited. Here the same kernels run in the same
# order on the same buffers' contents, so the bits are the per-layer path's
# (tests/test_decode_layers.py).

cdef extern from "attn_decode.h" nogil:  # kernels/csrc/attn_decode.h: _ops.attention_decode's block
    void ws_rms_norm_row(const float *x, const float *w, int64_t n, double eps, float *out)
    bint ws_row_nonfinite(const float *x, int64_t n)  # _ops.first_nonfinite_row's test (ops_simd.h)
    void ws_attention_decode(const float *qkv, int64_t heads, int64_t kvh, int64_t hd, int gated,
                             const float *q_norm, const float *k_norm, int norm_full, double eps, int64_t pos,
                             const float *c, const float *s, int64_t n_rot, int neox, float *k_cache,
                             float *v_cache, float scale, float *q, float *out, float *scores,
                             int64_t scores_stride, int threads)

# the columns of decode_layers_into's per-layer tables, one row a layer (engine/model/decode_plan.py
# fills them by these names): addresses (0 where absent: a part past `parts`, no Q/K norm)...
DECODE_PTRS = ("attn_norm", "qkv0", "qkv1", "qkv2", "wo", "q_norm", "k_norm", "k_cache", "v_cache",
               "ffn_norm", "router", "gates", "ups", "downs")
# ... and integers: the QKV projection's parts (1 concatenated, or Q, K, V each in its type),
# their types and rows, the output projection's type, the experts' types, count and width
DECODE_INTS = ("parts", "qkv_type0", "qkv_type1", "qkv_type2", "qkv_rows0", "qkv_rows1", "qkv_rows2",
               "wo_type", "gu_type", "d_type", "n_expert", "ff")
cdef enum:
    _P_ATTN_NORM = 0
    _P_QKV = 1        # 1..3
    _P_WO = 4
    _P_Q_NORM = 5
    _P_K_NORM = 6
    _P_K_CACHE = 7
    _P_V_CACHE = 8
    _P_FFN_NORM = 9
    _P_ROUTER = 10
    _P_GATES = 11
    _P_UPS = 12
    _P_DOWNS = 13
    _I_PARTS = 0
    _I_QKV_TYPE = 1   # 1..3
    _I_QKV_ROWS = 4   # 4..6
    _I_WO_TYPE = 7
    _I_GU_TYPE = 8
    _I_D_TYPE = 9
    _I_N_EXPERT = 10
    _I_FF = 11


def decode_layers_into(float[:, ::1] x, const uint64_t[:, ::1] ptrs, const int64_t[:, ::1] ints,
                       int64_t heads, int64_t kv_heads, int64_t hd, bint gated, bint norm_full, double eps,
                       int64_t pos, const float[:, ::1] cos, const float[:, ::1] sin, int n_rot, bint neox,
                       float scale, int64_t n_ctx, int64_t k, bint norm_topk, float[:, ::1] scores,
                       int threads=1):
    """One decode token through len(ptrs) attention + routed-MoE layers, its residual x:
    float32[1, E] updated in place, as forward.py's per-layer path does for each layer:

      h = rms_norm(x, attn_norm); qkv = h @ [Wq; Wk; Wv].T (parts concatenated or in turn);
      attn = _ops.attention_decode's block at pos (caches k_cache / v_cache: float32[n_ctx,
      kv_heads, hd]); x += attn @ Wo.T; h = rms_norm(x, ffn_norm); x += moe_route_decode_into's
      weighted sum of the router's top k experts on h.

    Row r of ptrs (uint64 addresses) and ints (int64) describe layer r in the columns
    DECODE_PTRS / DECODE_INTS name; every address must point at what that column names, in
    memory that outlives the call (the Model's weights, caches and norms: engine/model/decode_plan.py
    builds the tables; an address cannot be checked here, only the sizes and types). cos / sin:
    the RoPE tables float32[n_ctx, n_rot / 2]; scores: float32[>= heads, >= pos + 1] scratch.
    Returns the row of the first layer after which x holds a NaN or Inf (-1: none), the
    per-layer path's non-finite check; the layers after it still run, as there."""
    cdef int64_t L = ptrs.shape[0], E = x.shape[1], r, p, off, rows, total, qt
    cdef int64_t q_cols = (2 if gated else 1) * heads * hd, kv_cols = 2 * kv_heads * hd
    cdef int64_t attn_cols = heads * hd, X_max = 0, ff_max = 0, half = n_rot // 2
    if ptrs.shape[1] != len(DECODE_PTRS) or ints.shape[1] != len(DECODE_INTS) or ints.shape[0] != L:
        raise ValueError(f"decode_layers_into: tables [{L}, {ptrs.shape[1]}] / [{ints.shape[0]}, "
                         f"{ints.shape[1]}], need [layers, {len(DECODE_PTRS)}] / [layers, {len(DECODE_INTS)}]")
    if x.shape[0] != 1 or E % QK_K or E == 0:
        raise ValueError(f"decode_layers_into: x [{x.shape[0]}, {E}]: need one row, a multiple of {QK_K} wide")
    if threads < 1:
        raise ValueError(f"decode_layers_into: threads must be >= 1, got {threads}")
    if not (kv_heads > 0 and heads % kv_heads == 0 and hd > 0 and attn_cols % QK_K == 0):
        raise ValueError(f"decode_layers_into: {heads} heads over {kv_heads} kv heads of {hd}")
    if not (0 <= pos < n_ctx and pos < cos.shape[0] and 0 < n_rot <= hd and n_rot % 2 == 0
            and cos.shape[1] == half and sin.shape[1] == half and sin.shape[0] == cos.shape[0]):
        raise ValueError(f"decode_layers_into: position {pos} (n_ctx {n_ctx}), n_rot {n_rot}, rope tables "
                         f"[{cos.shape[0]}, {cos.shape[1]}]")
    if not (scores.shape[0] >= heads and scores.shape[1] >= pos + 1):
        raise ValueError(f"decode_layers_into: scores [{scores.shape[0]}, {scores.shape[1]}] < [{heads}, {pos + 1}]")
    for r in range(L):
        total = 0
        if not 1 <= ints[r, _I_PARTS] <= 3:
            raise ValueError(f"decode_layers_into: layer row {r}: {ints[r, _I_PARTS]} QKV parts")
        for p in range(ints[r, _I_PARTS]):
            if ints[r, _I_QKV_TYPE + p] not in SUPPORTED or ptrs[r, _P_QKV + p] == 0:
                raise ValueError(f"decode_layers_into: layer row {r}: QKV part {p} of type "
                                 f"{ints[r, _I_QKV_TYPE + p]} (or no address)")
            total += ints[r, _I_QKV_ROWS + p]
        if total != q_cols + kv_cols:
            raise ValueError(f"decode_layers_into: layer row {r}: QKV parts of {total} rows, need {q_cols + kv_cols}")
        if ints[r, _I_WO_TYPE] not in SUPPORTED or not moe_decode_supported(ints[r, _I_GU_TYPE], ints[r, _I_D_TYPE]):
            raise ValueError(f"decode_layers_into: layer row {r}: output / expert types {ints[r, _I_WO_TYPE]}, "
                             f"{ints[r, _I_GU_TYPE]}, {ints[r, _I_D_TYPE]} not supported")
        if not (1 <= k <= ints[r, _I_N_EXPERT] and ints[r, _I_FF] > 0 and ints[r, _I_FF] % QK_K == 0):
            raise ValueError(f"decode_layers_into: layer row {r}: {k} of {ints[r, _I_N_EXPERT]} experts "
                             f"of width {ints[r, _I_FF]}")
        for p in (_P_ATTN_NORM, _P_WO, _P_K_CACHE, _P_V_CACHE, _P_FFN_NORM, _P_ROUTER, _P_GATES, _P_UPS, _P_DOWNS):
            if ptrs[r, p] == 0:
                raise ValueError(f"decode_layers_into: layer row {r}: no address for {DECODE_PTRS[p]}")
        X_max = max(X_max, ints[r, _I_N_EXPERT])
        ff_max = max(ff_max, ints[r, _I_FF])
    if L == 0:
        return -1
    # scratch, one arena: the projections' Q8_K (widest input: E or heads * hd), the experts'
    # (h and k activation rows), each thread's partial sums, then the step's float buffers
    cdef int64_t mm_cols = max(E, attn_cols)
    cdef _Arena a
    _arena_open(&a, _q8k_bytes(mm_cols, 1) + _q8k_bytes(E + k * ff_max, 1 + k)
                + 4 * threads * _scratch_floats()
                + 4 * (3 * E + q_cols + kv_cols + 2 * attn_cols + 3 * k * ff_max + k * E + X_max + 2 * k)
                + 8 * (k + 3 * k))
    cdef _Q8K mq, eq
    cdef float *acc
    cdef float *h
    cdef float *proj
    cdef float *moe_out
    cdef float *qkv
    cdef float *q
    cdef float *attn
    cdef float *gu
    cdef float *act
    cdef float *y
    cdef float *probs
    cdef float *wts
    cdef float *used_w
    cdef int64_t *ids
    cdef const uint8_t **pv
    cdef float *xp = &x[0, 0]
    cdef const uint64_t *P
    cdef const int64_t *I
    cdef int64_t j, X, ff, gu_t, d_t, found = -1
    try:
        _q8k_take(&a, mm_cols, 1, &mq)
        _q8k_take(&a, E + k * ff_max, 1 + k, &eq)
        acc = <float *>_take(&a, 4 * threads * _scratch_floats())
        h = <float *>_take(&a, 4 * E)                 # float[E]: the normed residual
        proj = <float *>_take(&a, 4 * E)              # float[E]: attention's output projection
        moe_out = <float *>_take(&a, 4 * E)           # float[E]: the experts' weighted sum
        qkv = <float *>_take(&a, 4 * (q_cols + kv_cols))  # float[q_cols + kv_cols]
        q = <float *>_take(&a, 4 * attn_cols)         # float[heads, hd]
        attn = <float *>_take(&a, 4 * attn_cols)      # float[heads, hd]
        gu = <float *>_take(&a, 4 * 2 * k * ff_max)   # float[2k, ff]: gate rows, then up rows
        act = <float *>_take(&a, 4 * k * ff_max)      # float[k, ff]: SwiGLU
        y = <float *>_take(&a, 4 * k * E)             # float[k, E]: each expert's output
        probs = <float *>_take(&a, 4 * X_max)         # float[n_expert]
        wts = <float *>_take(&a, 4 * k)               # float[k]: by rank
        used_w = <float *>_take(&a, 4 * k)            # float[k]: by ascending id
        ids = <int64_t *>_take(&a, 8 * k)
        pv = <const uint8_t **>_take(&a, 8 * 3 * k)   # gate, up, down addresses by ascending id
        with nogil:
            for r in range(L):
                P = &ptrs[r, 0]
                I = &ints[r, 0]
                ws_rms_norm_row(xp, <const float *>P[_P_ATTN_NORM], E, eps, h)
                off = 0
                for p in range(I[_I_PARTS]):
                    qt = I[_I_QKV_TYPE + p]
                    rows = I[_I_QKV_ROWS + p]
                    _matmul_core(h, <const uint8_t *>P[_P_QKV + p], <int>qt, qkv + off, 1, rows, E,
                                 ws_block_bytes(<int>qt), mq.qs, mq.dq, mq.fb, acc, mq.bad, threads)
                    off = off + rows
                ws_attention_decode(qkv, heads, kv_heads, hd, gated, <const float *>P[_P_Q_NORM],
                                    <const float *>P[_P_K_NORM], norm_full, eps, pos, &cos[pos, 0],
                                    &sin[pos, 0], n_rot, neox, <float *>P[_P_K_CACHE], <float *>P[_P_V_CACHE],
                                    scale, q, attn, &scores[0, 0], scores.shape[1], threads)
                qt = I[_I_WO_TYPE]
                _matmul_core(attn, <const uint8_t *>P[_P_WO], <int>qt, proj, 1, E, attn_cols,
                             ws_block_bytes(<int>qt), mq.qs, mq.dq, mq.fb, acc, mq.bad, threads)
                for j in range(E):
                    xp[j] = xp[j] + proj[j]
                ws_rms_norm_row(xp, <const float *>P[_P_FFN_NORM], E, eps, h)
                X = I[_I_N_EXPERT]
                ff = I[_I_FF]
                gu_t = I[_I_GU_TYPE]
                d_t = I[_I_D_TYPE]
                _route(h, <const float *>P[_P_ROUTER], X, E, k, norm_topk, <const uint8_t *>P[_P_GATES],
                       <const uint8_t *>P[_P_UPS], <const uint8_t *>P[_P_DOWNS],
                       ff * (E // QK_K) * ws_block_bytes(<int>gu_t), E * (ff // QK_K) * ws_block_bytes(<int>d_t),
                       probs, ids, wts, pv, used_w, threads)
                _moe_decode_core(h, pv, <int>gu_t, pv + 2 * k, <int>d_t, used_w, k, E, ff, eq.qs, eq.dq, eq.fb,
                                 gu, act, y, moe_out, acc, eq.bad, threads)
                for j in range(E):
                    xp[j] = xp[j] + moe_out[j]
                if found < 0 and ws_row_nonfinite(xp, E):
                    found = r
    finally:
        free(a.base)
    return found
