# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""The small per-token operations of the forward pass, nogil, written to caller-owned buffers.

At decode (one token) each of these is microseconds of arithmetic that NumPy wraps in tens of
microseconds of temporaries and dispatch; 30 layers of them cost as much as the weight matmuls
of a small model. Each function here is one pass over its data, writes into `out` (which may be
the input for the in-place ones) and checks its shapes. kernels/reference/ops.py holds the NumPy versions:
the reference these are tested against (tests/test_ops_cython.py).

    rms_norm_into(x, w, eps, out)            out = x * w / sqrt(mean(x^2) + eps), per row
    rope_inplace(x, positions, cos, sin, n_rot, neox)
    swiglu_into(gate, up, out)               out = silu(gate) * up
    attend_one(q, k_cache, v_cache, n_kv, scale, out, scratch, threads)
                                             one query position against n_kv cached positions
    attend_causal(q, k_cache, v_cache, positions, scale, out, scratch, threads)
                                             prefill: each query position against the cache up
                                             to its own position
    attention_decode(qkv, ...)               one token's attention block between its two
                                             projections: Q/K norms, RoPE, the cache write,
                                             attention, the output gate
    first_nonfinite_row(x)                   the first row holding a NaN or Inf, or -1
    softmax_rows_into(x, out)                a router's probabilities, per row
    topk_weights_into(probs, ids, weights, norm, choose)
                                             a router's k experts by descending probability
                                             (or given ids) and their weights

The arithmetic of each row is in kernels/csrc/ops_simd.h, in loops the compiler vectorises (an
exp of its own, SIMD reductions). RMSNorm sums squares in double (as ggml's rms_norm); the
attention dot products and exp run in float SIMD lanes; so results agree with NumPy to float32
rounding, not bit for bit.
"""

from cython.parallel cimport prange, threadid
from libc.math cimport expf
from libc.stdint cimport int64_t
from libc.string cimport memset

cdef extern from "ops_simd.h" nogil:  # kernels/csrc/ops_simd.h: the rows' arithmetic, vectorised
    void ws_rms_norm_row(const float *x, const float *w, int64_t n, double eps, float *out)
    void ws_swiglu_row(const float *gate, const float *up, int64_t m, float *out)
    void ws_attend_group(const float *q, int64_t ng, const float *k, const float *v, int64_t n_kv,
                         int64_t row_stride, int64_t hd, float scale, float *scores,
                         int64_t scores_stride, float *out)
    void ws_softmax_row(const float *x, int64_t n, float *out)
    void ws_sigmoid_gate_row(float *out, const float *gate, int64_t n)
    bint ws_row_nonfinite(const float *x, int64_t n)
    void ws_topk_weights_row(const float *p, int64_t n, int64_t k, int choose, int norm, int64_t *ids,
                             float *w)
    void ws_scale_add_row(float *out, float *y, float w, int64_t n)

cdef extern from "attn_decode.h" nogil:  # kernels/csrc/attn_decode.h: shared with _kquants' decode_layers_into
    void ws_rope_heads(float *x, int64_t heads, int64_t hd, const float *c, const float *s, int64_t half, int neox)
    void ws_attend_heads(const float *q, const float *k_cache, const float *v_cache, int64_t heads, int64_t kvh,
                         int64_t hd, int64_t n_kv, float scale, float *scores, int64_t scores_stride, float *out,
                         const float *gate, int64_t gate_stride, int threads)
    void ws_attention_decode(const float *qkv, int64_t heads, int64_t kvh, int64_t hd, int gated,
                             const float *q_norm, const float *k_norm, int norm_full, double eps, int64_t pos,
                             const float *c, const float *s, int64_t n_rot, int neox, float *k_cache,
                             float *v_cache, float scale, float *q, float *out, float *scores,
                             int64_t scores_stride, int threads)


# Argument checks raise at once and format their message only when they fail: a decode step
# makes ~10 calls here per layer, and an f-string built on every call cost microseconds each.

cdef _check_caches(str who, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
                   Py_ssize_t heads, Py_ssize_t hd):
    """The K and V caches: float32[n_ctx, kv_heads, hd] both, kv_heads dividing the query heads."""
    cdef Py_ssize_t kvh = k_cache.shape[1]
    if not (kvh > 0 and heads % kvh == 0):
        raise ValueError(f"{who}: {heads} query heads over {kvh} kv heads")
    if not (k_cache.shape[2] == hd and v_cache.shape[0] == k_cache.shape[0]
            and v_cache.shape[1] == kvh and v_cache.shape[2] == hd):
        raise ValueError(f"{who}: caches [{k_cache.shape[0]}, {kvh}, {k_cache.shape[2]}] / "
                         f"[{v_cache.shape[0]}, {v_cache.shape[1]}, {v_cache.shape[2]}] for head_dim {hd}")


def rms_norm_into(const float[:, ::1] x, const float[::1] w, double eps, float[:, ::1] out):
    """out[i] = x[i] * w / sqrt(mean(x[i]^2) + eps) for each row i (out may be x)."""
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1], i, j
    if not (w.shape[0] == e):
        raise ValueError(f"rms_norm_into: weight has {w.shape[0]} values, rows have {e}")
    if not (out.shape[0] == n and out.shape[1] == e):
        raise ValueError(f"rms_norm_into: out is [{out.shape[0]}, {out.shape[1]}], x is [{n}, {e}]")
    with nogil:
        for i in range(n):
            ws_rms_norm_row(&x[i, 0], &w[0], e, eps, &out[i, 0])


def first_nonfinite_row(const float[:, ::1] x):
    """The index of the first row of x: float32[n, e] holding a NaN or +/-Inf, -1 if none.

    The forward pass's non-finite check (engine/model/forward.py) runs it on the residual after
    every layer and on the logits, so it is one branch-free pass a row (ws_row_nonfinite, which
    decode_layers_into runs too). About 0.1 us for a 576-wide row plus the call, 3 us for 49152
    logits."""
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1], i, found = -1
    if e == 0:
        return -1
    with nogil:
        for i in range(n):
            if ws_row_nonfinite(&x[i, 0], e):
                found = i
                break
    return found


def rope_inplace(float[:, :, ::1] x, const int64_t[::1] positions, const float[:, ::1] cos,
                 const float[:, ::1] sin, int n_rot, bint neox):
    """Rotate the first n_rot dimensions of every head of x[n, heads, head_dim] in place, row i
    by the angles of positions[i] (cos/sin: float32[n_ctx, n_rot / 2]). neox rotates
    (d, d + n_rot/2) pairs, else adjacent (2d, 2d + 1) pairs (llama.cpp's NEOX / NORM)."""
    cdef Py_ssize_t n = x.shape[0], heads = x.shape[1], hd = x.shape[2], i
    cdef Py_ssize_t half = n_rot // 2
    if not (positions.shape[0] == n):
        raise ValueError(f"rope_inplace: {positions.shape[0]} positions for {n} rows")
    if not (0 < n_rot <= hd and n_rot % 2 == 0):
        raise ValueError(f"rope_inplace: n_rot {n_rot} for head_dim {hd}")
    if not (cos.shape[1] == half and sin.shape[1] == half and sin.shape[0] == cos.shape[0]):
        raise ValueError(f"rope_inplace: tables are [{cos.shape[0]}, {cos.shape[1]}], need [n_ctx, {half}]")
    for i in range(n):
        if not (0 <= positions[i] < cos.shape[0]):
            raise ValueError(f"rope_inplace: position {positions[i]} outside the table's {cos.shape[0]}")
    cdef int64_t p
    with nogil:
        for i in range(n):
            p = positions[i]
            ws_rope_heads(&x[i, 0, 0], heads, hd, &cos[p, 0], &sin[p, 0], half, neox)


def sigmoid_gate_into(float[:, ::1] out, const float[:, :] gate):
    """out *= sigmoid(gate), row by row (gated attention's output gate over a prompt's rows): the
    row function the decode call uses (ws_attend_heads), so a prompt's token gets its bits, with
    this module's exp (NumPy's differs by an ulp) and no temporaries. gate's rows may be strided."""
    cdef Py_ssize_t n = out.shape[0], m = out.shape[1], i
    if not (gate.shape[0] == n and gate.shape[1] == m):
        raise ValueError(f"sigmoid_gate_into: out [{n}, {m}], gate [{gate.shape[0]}, {gate.shape[1]}]")
    if n == 0 or m == 0:
        return
    if gate.strides[1] != 4:
        raise ValueError("sigmoid_gate_into: gate's rows must be contiguous")
    with nogil:
        for i in range(n):
            ws_sigmoid_gate_row(&out[i, 0], &gate[i, 0], m)


def swiglu_into(const float[:, :] gate, const float[:, :] up, float[:, ::1] out):
    """out = gate / (1 + exp(-gate)) * up; gate and up may be strided views (the two halves of a
    fused gate/up product)."""
    cdef Py_ssize_t n = gate.shape[0], m = gate.shape[1], i, j
    if not (up.shape[0] == n and up.shape[1] == m and out.shape[0] == n and out.shape[1] == m):
        raise ValueError(f"swiglu_into: gate [{n}, {m}], up [{up.shape[0]}, {up.shape[1]}], "
                         f"out [{out.shape[0]}, {out.shape[1]}]")
    cdef float g
    if n == 0 or m == 0:
        return
    if gate.strides[1] == 4 and up.strides[1] == 4:  # rows contiguous (every caller's case)
        with nogil:
            for i in range(n):
                ws_swiglu_row(&gate[i, 0], &up[i, 0], m, &out[i, 0])
        return
    with nogil:
        for i in range(n):
            for j in range(m):
                g = gate[i, j]
                out[i, j] = g / (1.0 + expf(-g)) * up[i, j]


def moe_combine_into(float[:, ::1] y, const int64_t[:, ::1] rows, const float[:, ::1] weights,
                     float[:, ::1] out, int threads=1):
    """A prompt batch's routed experts summed: out[t] = sum over j of weights[t, j] * y[rows[t, j]]
    (out: float32[n, e], rows / weights: [n, k], y: float32[m, e]), j from 0 up, each product
    rounded before it is added to the sum, which starts at zero: the bits of NumPy's
    `out[t] += w * y` term by term. Rows are threaded; y's rows are scaled in place, so each may
    be one term's only (checked)."""
    cdef Py_ssize_t n = out.shape[0], e = out.shape[1], k = rows.shape[1], m = y.shape[0], t, j
    if not (rows.shape[0] == n and weights.shape[0] == n and weights.shape[1] == k and y.shape[1] == e):
        raise ValueError(f"moe_combine_into: y [{m}, {y.shape[1]}], rows [{rows.shape[0]}, {k}], "
                         f"weights [{weights.shape[0]}, {weights.shape[1]}], out [{n}, {e}]")
    if threads < 1:
        raise ValueError(f"moe_combine_into: threads must be >= 1, got {threads}")
    seen = bytearray(m)
    for t in range(n):
        for j in range(k):
            if not (0 <= rows[t, j] < m) or seen[rows[t, j]]:
                raise ValueError(f"moe_combine_into: row {rows[t, j]} (token {t}, term {j}) outside "
                                 f"[0, {m}) or a second term's")
            seen[rows[t, j]] = 1
    if e == 0:
        return
    with nogil:
        for t in prange(n, num_threads=threads, schedule="static"):
            memset(&out[t, 0], 0, e * sizeof(float))
            for j in range(k):
                ws_scale_add_row(&out[t, 0], &y[rows[t, j], 0], weights[t, j], e)


def attend_one(const float[:, ::1] q, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
               Py_ssize_t n_kv, float scale, float[:, ::1] out, float[:, ::1] scratch, int threads=1):
    """One query position: out[h] = softmax(scale * K_g q[h]) . V_g over cached positions
    0..n_kv-1, g = h // (heads / kv_heads) (grouped-query attention).
    q, out: float32[heads, head_dim]; k_cache, v_cache: float32[n_ctx, kv_heads, head_dim];
    scratch: float32[heads, >= n_kv] for the scores."""
    cdef Py_ssize_t heads = q.shape[0], hd = q.shape[1]
    _check_caches("attend_one", k_cache, v_cache, heads, hd)
    if not (0 < n_kv <= k_cache.shape[0]):
        raise ValueError(f"attend_one: n_kv {n_kv} for a cache of {k_cache.shape[0]}")
    if not (out.shape[0] == heads and out.shape[1] == hd):
        raise ValueError("attend_one: out must be [heads, head_dim]")
    if not (scratch.shape[0] >= heads and scratch.shape[1] >= n_kv):
        raise ValueError(f"attend_one: scratch [{scratch.shape[0]}, {scratch.shape[1]}] < [{heads}, {n_kv}]")
    with nogil:
        ws_attend_heads(&q[0, 0], &k_cache[0, 0, 0], &v_cache[0, 0, 0], heads, k_cache.shape[1], hd, n_kv,
                        scale, &scratch[0, 0], scratch.shape[1], &out[0, 0], NULL, 0, threads)


def softmax_rows_into(const float[:, ::1] x, float[:, ::1] out):
    """out[i] = softmax(x[i]) for each row (out may be x): a router's probabilities, one call
    instead of NumPy's max, subtract, exp, sum and divide (each a temporary) per MoE layer."""
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1], i
    if not (out.shape[0] == n and out.shape[1] == e):
        raise ValueError(f"softmax_rows_into: out is [{out.shape[0]}, {out.shape[1]}], x is [{n}, {e}]")
    if e == 0:
        return
    with nogil:
        for i in range(n):
            ws_softmax_row(&x[i, 0], e, &out[i, 0])


def topk_weights_into(const float[:, ::1] probs, int64_t[:, ::1] ids, float[:, ::1] weights,
                      bint norm, bint choose=True):
    """A router's choice per row of probs: float32[n, n_expert]. With choose, ids[i] (int64[n, k])
    becomes the k experts of highest probability, highest first, ties to the lower id (NumPy's
    stable argsort of -probs, cut at k; NaN last); without, ids holds the caller's choice
    (a routing source's) and is only checked. weights[i, j] = probs[i, ids[i, j]], divided by
    their sum (in j order) with norm. k * n_expert comparisons a row: no sort."""
    cdef Py_ssize_t n = probs.shape[0], e = probs.shape[1], k = ids.shape[1], i, j
    if not (ids.shape[0] == n and weights.shape[0] == n and weights.shape[1] == k):
        raise ValueError(f"topk_weights_into: probs [{n}, {e}], ids [{ids.shape[0]}, {k}], "
                         f"weights [{weights.shape[0]}, {weights.shape[1]}]")
    if not (1 <= k <= e):
        raise ValueError(f"topk_weights_into: k = {k} experts of {e}")
    if not choose:
        for i in range(n):
            for j in range(k):
                if not (0 <= ids[i, j] < e):
                    raise ValueError(f"topk_weights_into: expert id {ids[i, j]} (row {i}) outside [0, {e})")
    with nogil:
        for i in range(n):
            ws_topk_weights_row(&probs[i, 0], e, k, choose, norm, &ids[i, 0], &weights[i, 0])


def attention_decode(const float[:, ::1] qkv, Py_ssize_t heads, Py_ssize_t kv_heads, bint gated,
                     q_norm, k_norm, bint norm_full, double eps, Py_ssize_t pos,
                     const float[:, ::1] cos, const float[:, ::1] sin, int n_rot, bint neox,
                     float[:, :, ::1] k_cache, float[:, :, ::1] v_cache, float scale,
                     float[:, ::1] q, float[:, ::1] out, float[:, ::1] scratch, int threads=1):
    """One decode token's attention between its QKV and output projections, in one call (the
    per-call path of engine/model/forward.py makes ~10 calls and NumPy views for it, per layer):

      q[h] = Q of head h (gated: the first half of the head's [q; gate] rows), K and V of the token
      written to k_cache[pos] / v_cache[pos]; then Q and K RMS-normed (q_norm / k_norm: float32
      weights per head_dim, or over the whole projection with norm_full; None: no norm) and
      rotated by RoPE at pos (as rope_inplace); out[h] = attend_one's result over positions
      0..pos; gated: out *= sigmoid(gate).

    The same row functions as rms_norm_into, rope_inplace and attend_one, in the same order, so
    the bits are theirs; the gate's sigmoid uses this module's exp (NumPy's differs by an ulp).
    qkv: float32[1, (2 if gated else 1) * heads * hd + 2 * kv_heads * hd]; caches
    float32[n_ctx, kv_heads, hd]; q, out: float32[heads, hd]; scratch: float32[heads, >= pos + 1];
    cos / sin: float32[n_ctx, n_rot / 2]."""
    cdef Py_ssize_t hd = k_cache.shape[2]
    cdef Py_ssize_t qw = (2 if gated else 1) * hd   # a head's rows in qkv
    cdef Py_ssize_t kv0 = heads * qw, kvw = kv_heads * hd, n_kv = pos + 1, half = n_rot // 2
    _check_caches("attention_decode", k_cache, v_cache, heads, hd)
    if not (k_cache.shape[1] == kv_heads):
        raise ValueError(f"attention_decode: caches hold {k_cache.shape[1]} kv heads, the call says {kv_heads}")
    if not (qkv.shape[0] == 1 and qkv.shape[1] == kv0 + 2 * kvw):
        raise ValueError(f"attention_decode: qkv is [{qkv.shape[0]}, {qkv.shape[1]}], need [1, {kv0 + 2 * kvw}]")
    if not (0 <= pos < k_cache.shape[0] and pos < cos.shape[0]):
        raise ValueError(f"attention_decode: position {pos} outside the cache ({k_cache.shape[0]}) "
                         f"or rope table ({cos.shape[0]})")
    if not (0 < n_rot <= hd and n_rot % 2 == 0 and cos.shape[1] == half and sin.shape[1] == half
            and sin.shape[0] == cos.shape[0]):
        raise ValueError(f"attention_decode: n_rot {n_rot}, head_dim {hd}, "
                         f"rope tables [{cos.shape[0]}, {cos.shape[1]}]")
    if not (q.shape[0] == heads and q.shape[1] == hd and out.shape[0] == heads and out.shape[1] == hd):
        raise ValueError(f"attention_decode: q [{q.shape[0]}, {q.shape[1]}] and out "
                         f"[{out.shape[0]}, {out.shape[1]}] "
                         f"must be [{heads}, {hd}]")
    if not (scratch.shape[0] >= heads and scratch.shape[1] >= n_kv):
        raise ValueError(f"attention_decode: scratch [{scratch.shape[0]}, {scratch.shape[1]}] "
                         f"< [{heads}, {n_kv}]")
    cdef const float[::1] qn, kn
    cdef const float *qnp = NULL
    cdef const float *knp = NULL
    cdef Py_ssize_t nw = (heads if norm_full else 1) * hd, kw = (kv_heads if norm_full else 1) * hd
    if q_norm is not None:
        qn = q_norm
        if not (qn.shape[0] == nw):
            raise ValueError(f"attention_decode: q_norm has {qn.shape[0]} values, need {nw}")
        qnp = &qn[0]
    if k_norm is not None:
        kn = k_norm
        if not (kn.shape[0] == kw):
            raise ValueError(f"attention_decode: k_norm has {kn.shape[0]} values, need {kw}")
        knp = &kn[0]
    with nogil:
        ws_attention_decode(&qkv[0, 0], heads, kv_heads, hd, gated, qnp, knp, norm_full, eps, pos,
                            &cos[pos, 0], &sin[pos, 0], n_rot, neox, &k_cache[0, 0, 0], &v_cache[0, 0, 0],
                            scale, &q[0, 0], &out[0, 0], &scratch[0, 0], scratch.shape[1], threads)


def attend_causal(const float[:, :, ::1] q, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
                  const int64_t[::1] positions, float scale, float[:, :, ::1] out, float[:, ::1] scratch,
                  int threads=1):
    """Prefill attention: out[i, h] = attend_one's result for query q[i, h] over the cached
    positions 0..positions[i] (causal; the caches already hold the call's own keys and values).
    Each token's query heads that share a kv head go together (ws_attend_group: a block of keys
    stays in L1 for all of them), with each head's bits those of attend_one, so a prefill token
    gets the bits a decode step at its position would; the (token, kv head) pairs are spread over
    the threads round robin, kv head by kv head (later positions read more keys).
    q, out: float32[n, heads, head_dim]; caches float32[n_ctx, kv_heads, head_dim]; scratch:
    float32[>= threads * heads / kv_heads, >= max(positions) + 1] (each thread's heads' scores)."""
    cdef Py_ssize_t n = q.shape[0], heads = q.shape[1], hd = q.shape[2], kvh = k_cache.shape[1]
    cdef Py_ssize_t i, g, j, top = -1
    _check_caches("attend_causal", k_cache, v_cache, heads, hd)
    if not (positions.shape[0] == n and out.shape[0] == n and out.shape[1] == heads and out.shape[2] == hd):
        raise ValueError(f"attend_causal: {positions.shape[0]} positions, out [{out.shape[0]}, {out.shape[1]}, "
                         f"{out.shape[2]}] for q [{n}, {heads}, {hd}]")
    if not (threads >= 1):
        raise ValueError(f"attend_causal: threads must be >= 1, got {threads}")
    for i in range(n):
        if not (0 <= positions[i] < k_cache.shape[0]):
            raise ValueError(f"attend_causal: position {positions[i]} outside the cache's {k_cache.shape[0]}")
        top = max(top, positions[i])
    cdef Py_ssize_t group = heads // kvh, stride = kvh * hd, sstride = scratch.shape[1]
    if not (scratch.shape[0] >= threads * group and sstride > top):
        raise ValueError(f"attend_causal: scratch [{scratch.shape[0]}, {sstride}] "
                         f"< [{threads * group}, {top + 1}] ({threads} threads x {group} heads a kv head)")
    for j in prange(n * kvh, nogil=True, num_threads=threads, schedule="static", chunksize=1):
        g = j // n   # kv head by kv head: one kv head's K and V (512 KB at 512 positions) stay in L2
        i = j % n
        ws_attend_group(&q[i, g * group, 0], group, &k_cache[0, g, 0], &v_cache[0, g, 0], positions[i] + 1,
                        stride, hd, scale, &scratch[threadid() * group, 0], sstride, &out[i, g * group, 0])
