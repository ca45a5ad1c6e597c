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
    first_nonfinite_row(x)                   the first row holding a NaN or Inf, or -1

The arithmetic of each row is in kernels/csrc/ops_simd.h, in loops the compiler vectorises (an
exp of its own, SIMD reductions). RMSNorm sums squares in double (as ggml's rms_norm); the
attention dot products and exp run in float SIMD lanes; so results agree with NumPy to float32
rounding, not bit for bit.
"""

from cython.parallel cimport prange
from libc.math cimport expf
from libc.stdint cimport int64_t, uint32_t

cdef extern from "ops_simd.h" nogil:  # kernels/csrc/ops_simd.h: the rows' arithmetic, vectorised
    void ws_rms_norm_row(const float *x, const float *w, int64_t n, double eps, float *out)
    void ws_rope_neox_row(float *x, const float *c, const float *s, int64_t half)
    void ws_rope_norm_row(float *x, const float *c, const float *s, int64_t half)
    void ws_swiglu_row(const float *gate, const float *up, int64_t m, float *out)
    void ws_attend_head(const float *q, const float *k, const float *v, int64_t n_kv,
                        int64_t row_stride, int64_t hd, float scale, float *scores, float *out)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def rms_norm_into(const float[:, ::1] x, const float[::1] w, double eps, float[:, ::1] out):
    """out[i] = x[i] * w / sqrt(mean(x[i]^2) + eps) for each row i (out may be x)."""
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1], i, j
    _check(w.shape[0] == e, f"rms_norm_into: weight has {w.shape[0]} values, rows have {e}")
    _check(out.shape[0] == n and out.shape[1] == e,
           f"rms_norm_into: out is [{out.shape[0]}, {out.shape[1]}], x is [{n}, {e}]")
    with nogil:
        for i in range(n):
            ws_rms_norm_row(&x[i, 0], &w[0], e, eps, &out[i, 0])


def first_nonfinite_row(const float[:, ::1] x):
    """The index of the first row of x: float32[n, e] holding a NaN or +/-Inf, -1 if none.

    The forward pass's non-finite check (engine/model/forward.py) runs it on the residual after
    every layer and on the logits, so it is one branch-free pass: a float is NaN or Inf exactly
    when its bits without the sign are >= 0x7F800000 (all-ones exponent), and the max of those
    bits over a row vectorises (an integer max; a float test would not, without -ffast-math).
    About 0.1 us for a 576-wide row plus the call, 3 us for 49152 logits."""
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1], i, j, found = -1
    cdef const uint32_t *bits
    cdef uint32_t top
    if e == 0:
        return -1
    with nogil:
        for i in range(n):
            bits = <const uint32_t *>&x[i, 0]
            top = 0
            for j in range(e):
                top = max(top, bits[j] & 0x7FFFFFFFu)
            if top >= 0x7F800000u:
                found = i
                break
    return found


def rope_inplace(float[:, :, ::1] x, const int64_t[::1] positions, const float[:, ::1] cos,
                 const float[:, ::1] sin, int n_rot, bint neox):
    """Rotate the first n_rot dimensions of every head of x[n, heads, head_dim] in place, row i
    by the angles of positions[i] (cos/sin: float32[n_ctx, n_rot / 2]). neox rotates
    (d, d + n_rot/2) pairs, else adjacent (2d, 2d + 1) pairs (llama.cpp's NEOX / NORM)."""
    cdef Py_ssize_t n = x.shape[0], heads = x.shape[1], hd = x.shape[2], i, h, d
    cdef Py_ssize_t half = n_rot // 2
    _check(positions.shape[0] == n, f"rope_inplace: {positions.shape[0]} positions for {n} rows")
    _check(0 < n_rot <= hd and n_rot % 2 == 0, f"rope_inplace: n_rot {n_rot} for head_dim {hd}")
    _check(cos.shape[1] == half and sin.shape[1] == half and sin.shape[0] == cos.shape[0],
           f"rope_inplace: tables are [{cos.shape[0]}, {cos.shape[1]}], need [n_ctx, {half}]")
    for i in range(n):
        _check(0 <= positions[i] < cos.shape[0],
               f"rope_inplace: position {positions[i]} outside the table's {cos.shape[0]}")
    cdef int64_t p
    with nogil:
        for i in range(n):
            p = positions[i]
            for h in range(heads):
                if neox:
                    ws_rope_neox_row(&x[i, h, 0], &cos[p, 0], &sin[p, 0], half)
                else:
                    ws_rope_norm_row(&x[i, h, 0], &cos[p, 0], &sin[p, 0], half)


def swiglu_into(const float[:, :] gate, const float[:, :] up, float[:, ::1] out):
    """out = gate / (1 + exp(-gate)) * up; gate and up may be strided views (the two halves of a
    fused gate/up product)."""
    cdef Py_ssize_t n = gate.shape[0], m = gate.shape[1], i, j
    _check(up.shape[0] == n and up.shape[1] == m and out.shape[0] == n and out.shape[1] == m,
           f"swiglu_into: gate [{n}, {m}], up [{up.shape[0]}, {up.shape[1]}], out [{out.shape[0]}, {out.shape[1]}]")
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


def attend_one(const float[:, ::1] q, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
               Py_ssize_t n_kv, float scale, float[:, ::1] out, float[:, ::1] scratch, int threads=1):
    """One query position: out[h] = softmax(scale * K_g q[h]) . V_g over cached positions
    0..n_kv-1, g = h // (heads / kv_heads) (grouped-query attention).
    q, out: float32[heads, head_dim]; k_cache, v_cache: float32[n_ctx, kv_heads, head_dim];
    scratch: float32[heads, >= n_kv] for the scores."""
    cdef Py_ssize_t heads = q.shape[0], hd = q.shape[1], kvh = k_cache.shape[1], h, g
    _check(kvh > 0 and heads % kvh == 0, f"attend_one: {heads} query heads over {kvh} kv heads")
    _check(k_cache.shape[2] == hd and v_cache.shape[1] == kvh and v_cache.shape[2] == hd
           and v_cache.shape[0] == k_cache.shape[0],
           f"attend_one: caches [{k_cache.shape[0]}, {kvh}, {k_cache.shape[2]}] / "
           f"[{v_cache.shape[0]}, {v_cache.shape[1]}, {v_cache.shape[2]}] for head_dim {hd}")
    _check(0 < n_kv <= k_cache.shape[0], f"attend_one: n_kv {n_kv} for a cache of {k_cache.shape[0]}")
    _check(out.shape[0] == heads and out.shape[1] == hd, "attend_one: out must be [heads, head_dim]")
    _check(scratch.shape[0] >= heads and scratch.shape[1] >= n_kv,
           f"attend_one: scratch [{scratch.shape[0]}, {scratch.shape[1]}] < [{heads}, {n_kv}]")
    cdef Py_ssize_t group = heads // kvh, stride = kvh * hd
    # one thread unless the caches are long enough to pay for waking the other
    cdef int nt = threads if n_kv * heads * hd >= 262144 else 1
    for h in prange(heads, nogil=True, num_threads=nt, schedule="static"):
        g = h // group
        ws_attend_head(&q[h, 0], &k_cache[0, g, 0], &v_cache[0, g, 0], n_kv, stride, hd, scale,
                       &scratch[h, 0], &out[h, 0])
