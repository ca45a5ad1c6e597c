# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""The Gated DeltaNet layer's kernels (Qwen3.5 / Qwen3-Next linear attention), nogil, OpenMP,
written to caller-owned buffers. kernels/reference/deltanet.py holds the NumPy versions and the
math; tests/test_deltanet.py checks these against them.

    conv1d_silu_into(x, conv_state, weight, out, threads)
        out = silu(depthwise causal conv1d over time); conv_state carried in place
    gated_delta_rule_into(q, k, v, g, beta, state, out, eps, tiled, threads)
        the recurrence, every token, every value head; state updated in place
    gated_rms_norm_into(x, weight, z, eps, out, threads)
        out = rmsnorm(x) * weight * silu(z), per row

One function serves decode (n = 1) and prefill (n in the thousands). The recurrence's columns
are independent (column j of S^T k, delta, out and S needs only column j of S), so a work item is
64 columns of one value head through every token: a 32 KiB block of the state (Dk = 128) that
stays in L1 for the whole token loop, the head's q / k normalised by the item itself. Per token:

    pass 1 (once per call)   kv = S^T kn, sq = S^T qn            reads the block
    token t                  delta = beta (v - exp(g) kv)
                             out   = exp(g) sq + (kn . qn) delta  (= S_new^T qn, no pass needed)
    sweep                    S = exp(g) S + kn (x) delta, row by row, and while each new row is
                             in registers: kv' += kn'[i] row, sq' += qn'[i] row for token t + 1

so a decode step is 2 reads + 1 write of the state, of which memory sees 1 read + 1 write (the
second read hits L1), and each further prefill token 1 read + 1 write of an L1-resident block.
All loops over the state run along its contiguous Dv rows (element-wise, so -O3 vectorises them
without reassociating a sum); the short dot products (norms, kn . qn) add in double, in 8 partial
sums. SiLU uses an exp written in arithmetic (_exp_neg), so its loops vectorise too.

Inputs may be views whose outer axes are strided (e.g. q, k, v sliced out of the conv's output
and reshaped); the last axis of every array must be contiguous. Outputs and the state are
C-contiguous, except `out` of conv1d_silu_into / gated_rms_norm_into, which follow their input's
rule (so either may be written in place over its input).
"""

from cython.parallel cimport prange
from libc.math cimport expf, fabsf, sqrt
from libc.stdint cimport int32_t
from libc.string cimport memcpy


cdef extern from "deltanet_simd.h" nogil:  # kernels/csrc/deltanet_simd.h: the per-token sweep, vectorised
    int WS_DN_SWEEP
    void ws_dn_write_read64(float *S, Py_ssize_t ld, Py_ssize_t dk, float decay, const float *kn,
                            const float *delta, const float *kn2, const float *qn2, float *kv, float *sq)

cdef enum:
    MAX_D = 512        # largest Dk / Dv: each work item's q / k scratch is on the stack (4 x 2 KiB)
    MAX_K = 16         # largest conv kernel width
    CONV_BLOCK = 64    # channels per conv task: one row of the window is 4 AVX-512 vectors
    LANES = 8          # partial sums of a dot product (one AVX-512 vector of doubles)
    COLS = 64          # state columns per work item of the recurrence (a 32 KiB block at Dk = 128)
    LOCAL_ROWS = 128   # a prefill's block of up to this many rows runs on a contiguous copy (32 KiB)


# ---- argument checks -----------------------------------------------------------------------------
# Every message is built only when the check fails: the calls are microseconds of work at decode,
# and formatting a shape costs about as much.
def _describe(a):
    return f"{getattr(a, 'dtype', type(a).__name__)}{list(getattr(a, 'shape', ()))}"


def _bad(fn, name, need, a, e=None):
    return ValueError(f"{fn}: {name} must be {need}, got {_describe(a)}" + (f" ({e})" if e else ""))


cdef inline int _rows_contiguous(str fn, str name, Py_ssize_t stride, Py_ssize_t extent) except -1:
    """The last axis of every array is read as a contiguous row of floats."""
    if stride != sizeof(float) and extent > 1:
        raise ValueError(f"{fn}: {name}'s last axis must be contiguous (stride {stride} bytes, "
                         f"need {sizeof(float)})")
    return 0


# a typed memoryview takes None without complaint (and then has no data): each helper refuses it
cdef const float[:, :, :] _in3(a, str fn, str name) except *:
    cdef const float[:, :, :] m
    if a is None:
        raise _bad(fn, name, "a float32 3-D array", a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, "a float32 3-D array", a, e) from None
    _rows_contiguous(fn, name, m.strides[2], m.shape[2])
    return m


cdef const float[:, :] _in2(a, str fn, str name) except *:
    cdef const float[:, :] m
    if a is None:
        raise _bad(fn, name, "a float32 2-D array", a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, "a float32 2-D array", a, e) from None
    _rows_contiguous(fn, name, m.strides[1], m.shape[1])
    return m


cdef const float[:, ::1] _in2c(a, str fn, str name, str need) except *:
    cdef const float[:, ::1] m
    if a is None:
        raise _bad(fn, name, need, a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, need, a, e) from None
    return m


cdef float[:, :] _out2(a, str fn, str name) except *:
    cdef float[:, :] m
    if a is None:
        raise _bad(fn, name, "a writable float32 2-D array", a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, "a writable float32 2-D array", a, e) from None
    _rows_contiguous(fn, name, m.strides[1], m.shape[1])
    return m


cdef float[:, ::1] _out2c(a, str fn, str name, str need) except *:
    cdef float[:, ::1] m
    if a is None:
        raise _bad(fn, name, need, a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, need, a, e) from None
    return m


cdef float[:, :, ::1] _out3c(a, str fn, str name, str need) except *:
    cdef float[:, :, ::1] m
    if a is None:
        raise _bad(fn, name, need, a)
    try:
        m = a
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, name, need, a, e) from None
    return m


cdef inline Py_ssize_t _floats(Py_ssize_t stride_bytes) noexcept nogil:
    return stride_bytes // <Py_ssize_t>sizeof(float)


# ---- SiLU with an exp the compiler can vectorise -----------------------------------------------
cdef inline float _exp_neg(float x) noexcept nogil:
    """e^x for x <= 0, to about 2 ulp, in arithmetic only, so loops over it vectorise (libm's
    expf is a call per element, several times the rest of a SiLU). x = n ln2 + r, |r| <= ln2 / 2;
    e^r by Cephes' degree-6 polynomial; 2^n written straight into the exponent bits, n held at
    -126 or above so that e^x below 2^-126 (x < -87.3) reads as about 1e-38, never a denormal.
    Right for x >= -2^21; every constant is cast to float (a bare literal is a double and would
    widen the arithmetic)."""
    cdef float n, r, p, scale
    cdef int32_t e
    # round(x / ln 2): adding 1.5 * 2^23 leaves no bits for a fraction (floorf would be a call)
    n = (x * <float>1.44269504088896341 + <float>12582912.0) - <float>12582912.0
    r = x - n * <float>0.693359375  # ln 2 in two parts, so n ln 2 subtracts exactly
    r = r + n * <float>2.12194440e-4
    p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * r * r + r + <float>1.0
    e = <int32_t>n
    e = e if e > -126 else -126  # an integer clamp: a float one lets the compiler split the caller's paths
    e = (e + 127) << 23
    memcpy(&scale, &e, sizeof(float))  # a bit cast (compilers turn it into a register move)
    return p * scale


cdef inline float _silu(float a) noexcept nogil:
    """a * sigmoid(a), from e = e^-|a| <= 1 (no overflow on either side):
    sigmoid(a) = 1 / (1 + e) for a >= 0, e / (1 + e) below."""
    cdef float e = _exp_neg(-fabsf(a))
    return a * ((<float>1.0 if a >= 0 else e) / (<float>1.0 + e))


# ---- conv1d + SiLU -----------------------------------------------------------------------------


cdef inline void _conv_cols(const float *x, Py_ssize_t xs, float *state, const float *w, float *out,
                            Py_ssize_t os, Py_ssize_t n, Py_ssize_t C, Py_ssize_t K, Py_ssize_t bw) noexcept nogil:
    """Channels [c0, c0 + bw) of conv1d_silu; every pointer is at channel c0 (x, out: row t at
    t * xs / t * os floats; state: [K-1, C]; w: [C, K] rows). The block keeps the last K inputs
    of its channels in `win` and reads each x element once, before writing that step's output,
    so out may be x."""
    cdef float wt[MAX_K][CONV_BLOCK]   # wt[j][c] = w[c, j]: the weights transposed, so c vectorises
    cdef float win[MAX_K][CONV_BLOCK]  # win[j][c] = xx[t + j, c]; row K-1 is step t's own input
    cdef float acc[CONV_BLOCK]
    cdef Py_ssize_t t, j, c
    cdef const float *xt
    cdef float *ot
    for j in range(K):
        for c in range(bw):
            wt[j][c] = w[c * K + j]
    for j in range(K - 1):
        for c in range(bw):
            win[j][c] = state[j * C + c]
    for t in range(n):
        xt = x + t * xs
        for c in range(bw):
            win[K - 1][c] = xt[c]
        for c in range(bw):
            acc[c] = wt[0][c] * win[0][c]
        for j in range(1, K):
            for c in range(bw):
                acc[c] = acc[c] + wt[j][c] * win[j][c]
        ot = out + t * os
        for c in range(bw):
            ot[c] = _silu(acc[c])
        for j in range(K - 1):  # slide the window one step
            for c in range(bw):
                win[j][c] = win[j + 1][c]
    for j in range(K - 1):
        for c in range(bw):
            state[j * C + c] = win[j][c]


cdef void _conv_block(const float *x, Py_ssize_t xs, float *state, const float *w, float *out,
                      Py_ssize_t os, Py_ssize_t n, Py_ssize_t C, Py_ssize_t K, Py_ssize_t bw) noexcept nogil:
    """_conv_cols, compiled apart for a full block at K = 4 (Qwen3.5's and Qwen3-Next's width):
    with both constant the compiler vectorises the weights' transpose (4 loads and shuffles
    instead of 256 strided loads, most of a decode step) and unrolls the window's loops."""
    if K == 4 and bw == CONV_BLOCK:
        _conv_cols(x, xs, state, w, out, os, n, C, 4, CONV_BLOCK)
    else:
        _conv_cols(x, xs, state, w, out, os, n, C, K, bw)


def conv1d_silu_into(x, conv_state, weight, out, int threads=1):
    """out[t, c] = silu(sum_j weight[c, j] * xx[t + j, c]), xx = concat(conv_state, x) along
    time; then conv_state = the last K-1 rows of xx (in place). No bias.

    x: float32[n, C]; conv_state: float32[K-1, C], C-contiguous, oldest step first;
    weight: float32[C, K], C-contiguous; out: float32[n, C] (may be x). Threads split the
    channels in blocks of 64; n = 1 (decode) and long prefills take the same path."""
    fn = "conv1d_silu_into"
    cdef const float[:, :] xv = _in2(x, fn, "x")
    cdef float[:, :] ov = _out2(out, fn, "out")
    cdef float[:, ::1] sv = _out2c(conv_state, fn, "conv_state", "a writable C-contiguous float32[K-1, C] array")
    cdef const float[:, ::1] wv = _in2c(weight, fn, "weight", "a C-contiguous float32[C, K] array")
    cdef Py_ssize_t n = xv.shape[0], C = xv.shape[1], K = wv.shape[1]
    if wv.shape[0] != C:
        raise ValueError(f"{fn}: weight is {_describe(weight)}, x has {C} channels: need [{C}, K]")
    if not (1 <= K <= MAX_K):
        raise ValueError(f"{fn}: weight has kernel width {K}, need 1..{MAX_K}")
    if not (sv.shape[0] == K - 1 and sv.shape[1] == C):
        raise ValueError(f"{fn}: conv_state is {_describe(conv_state)}, need [{K - 1}, {C}] "
                         "(the K-1 steps before x, of C channels)")
    if not (ov.shape[0] == n and ov.shape[1] == C):
        raise ValueError(f"{fn}: out is {_describe(out)}, x is [{n}, {C}]")
    if threads < 1:
        raise ValueError(f"{fn}: threads must be >= 1, got {threads}")
    cdef Py_ssize_t xs = _floats(xv.strides[0]), os = _floats(ov.strides[0])
    cdef Py_ssize_t nb = (C + CONV_BLOCK - 1) // CONV_BLOCK, b, c0
    # a second thread pays for its wake-up (a few microseconds) only on a prefill-sized input
    cdef int nt = threads if n * C >= 65536 else 1
    if n == 0 or C == 0:
        return
    cdef const float *xp = &xv[0, 0]
    cdef float *op = &ov[0, 0]
    cdef float *sp = &sv[0, 0] if K > 1 else NULL  # K = 1: no history, conv_state is [0, C]
    cdef const float *wp = &wv[0, 0]
    for b in prange(nb, nogil=True, num_threads=nt, schedule="static"):
        c0 = b * CONV_BLOCK
        _conv_block(xp + c0, xs, sp + c0 if K > 1 else NULL, wp + c0 * K, op + c0, os, n, C, K,
                    min(CONV_BLOCK, C - c0))


# ---- the gated delta rule ----------------------------------------------------------------------
cdef inline double _dot(const float *x, const float *y, Py_ssize_t d) noexcept nogil:
    """sum(x * y) in double, in LANES independent partial sums: one running sum would be a chain
    of d dependent additions (4 cycles each), longer than a token's whole update of a block."""
    cdef double acc[LANES]
    cdef Py_ssize_t i = 0, l, d0 = d - d % LANES
    for l in range(LANES):
        acc[l] = 0
    while i < d0:
        for l in range(LANES):
            acc[l] = acc[l] + <double>x[i + l] * y[i + l]
        i = i + LANES
    for i in range(d0, d):
        acc[0] = acc[0] + <double>x[i] * y[i]
    for l in range(1, LANES):
        acc[0] = acc[0] + acc[l]
    return acc[0]


cdef inline void _l2norm(const float *x, float *y, Py_ssize_t d, float eps, float scale) noexcept nogil:
    """y = x * scale / sqrt(sum(x^2) + eps)"""
    cdef Py_ssize_t i
    cdef float s = <float>(scale / sqrt(_dot(x, x, d) + eps))
    for i in range(d):
        y[i] = x[i] * s


cdef inline void _read(const float *S, Py_ssize_t ld, Py_ssize_t dk, Py_ssize_t w, const float *kn,
                       const float *qn, float *kv, float *sq) noexcept nogil:
    """kv = S^T kn, sq = S^T qn over w columns (S: dk rows, ld floats apart)."""
    cdef Py_ssize_t i, j
    cdef const float *row
    cdef float ki, qi
    for j in range(w):
        kv[j] = 0
        sq[j] = 0
    for i in range(dk):
        row = S + i * ld
        ki = kn[i]
        qi = qn[i]
        for j in range(w):
            kv[j] = kv[j] + ki * row[j]
            sq[j] = sq[j] + qi * row[j]


cdef inline void _write(float *S, Py_ssize_t ld, Py_ssize_t dk, Py_ssize_t w, float decay, const float *kn,
                        const float *delta) noexcept nogil:
    """S = decay S + kn (x) delta over w columns."""
    cdef Py_ssize_t i, j
    cdef float *row
    cdef float ki
    for i in range(dk):
        row = S + i * ld
        ki = kn[i]
        for j in range(w):
            row[j] = decay * row[j] + ki * delta[j]


cdef inline void _write_read(float *S, Py_ssize_t ld, Py_ssize_t dk, Py_ssize_t w, float decay,
                             const float *kn, const float *delta, const float *kn2, const float *qn2,
                             float *kv, float *sq) noexcept nogil:
    """_write, then _read with the next token's kn2 / qn2, in one sweep: each new row is used
    while still in registers. With w the constant COLS the accumulators and delta stay in
    vector registers across the dk rows (1 load + 1 store of S per element): with AVX-512 or AVX2,
    csrc/deltanet_simd.h's intrinsics, since GCC keeps this loop's kv / sq on the stack."""
    cdef Py_ssize_t i, j
    cdef float *row
    cdef float ki, k2, q2, r
    if WS_DN_SWEEP and w == COLS:
        ws_dn_write_read64(S, ld, dk, decay, kn, delta, kn2, qn2, kv, sq)
        return
    for j in range(w):
        kv[j] = 0
        sq[j] = 0
    for i in range(dk):
        row = S + i * ld
        ki = kn[i]
        k2 = kn2[i]
        q2 = qn2[i]
        for j in range(w):
            r = decay * row[j] + ki * delta[j]
            row[j] = r
            kv[j] = kv[j] + k2 * r
            sq[j] = sq[j] + q2 * r


cdef inline void _delta_cols(const float *q, Py_ssize_t qs, const float *k, Py_ssize_t ks,
                             const float *v, Py_ssize_t vs, const float *g, Py_ssize_t gs,
                             const float *beta, Py_ssize_t bs, float *S, Py_ssize_t ld,
                             float *out, Py_ssize_t os, Py_ssize_t n, Py_ssize_t dk, Py_ssize_t w,
                             float eps) noexcept nogil:
    """w <= COLS columns of one value head's state, through every token. The columns of the
    recurrence are independent (column j of kv, delta, out and S needs only column j of S), so
    a block of dk x COLS floats (32 KiB at Dk = 128) stays in L1 for the whole token loop.

    q, k: the head's key head's rows at token 0 (token t at t * qs / t * ks floats); v, out:
    the head's rows at the block's first column (t * vs, t * os); g, beta: the head's values
    (t * gs, t * bs); S: the state at the block's first column, rows ld floats apart."""
    cdef float qa[MAX_D]
    cdef float qb[MAX_D]
    cdef float ka[MAX_D]
    cdef float kb[MAX_D]
    cdef float kv[COLS]      # S^T kn of the state before this token's decay
    cdef float sq[COLS]      # S^T qn, likewise
    cdef float delta[COLS]
    cdef float *qn = qa
    cdef float *kn = ka
    cdef float *qn2 = qb     # the next token's, read in the same sweep as this token's write
    cdef float *kn2 = kb
    cdef float *tmp
    cdef float *o
    cdef const float *vt
    cdef float decay, b, qk
    cdef float qscale = <float>(1.0 / sqrt(<double>dk))
    cdef Py_ssize_t t, i, j
    # Several tokens: the block runs on a contiguous copy. In place, its rows are ld floats apart
    # (512 bytes at Dv = 128), so its 32 KiB fall in half of L1's sets, which hold 24 KiB: each
    # token's sweep went to L2 (measured: a 35B-A3B-shaped layer's 512 tokens, 1 thread, 36 -> 19 ms).
    cdef float local[LOCAL_ROWS * COLS]
    cdef float *S0 = S
    cdef Py_ssize_t ld0 = ld
    cdef bint copy = n > 1 and w == COLS and dk <= LOCAL_ROWS
    if copy:
        for i in range(dk):
            memcpy(local + i * COLS, S0 + i * ld0, COLS * sizeof(float))
        S = local
        ld = COLS

    _l2norm(q, qn, dk, eps, qscale)
    _l2norm(k, kn, dk, eps, 1.0)
    _read(S, ld, dk, w, kn, qn, kv, sq)
    for t in range(n):
        decay = expf(g[t * gs])
        b = beta[t * bs]
        qk = <float>_dot(kn, qn, dk)
        vt = v + t * vs
        o = out + t * os
        for j in range(w):
            delta[j] = (vt[j] - decay * kv[j]) * b
            o[j] = decay * sq[j] + qk * delta[j]  # S_new^T qn without reading S_new
        if t + 1 < n:
            _l2norm(q + (t + 1) * qs, qn2, dk, eps, qscale)
            _l2norm(k + (t + 1) * ks, kn2, dk, eps, 1.0)
            _write_read(S, ld, dk, w, decay, kn, delta, kn2, qn2, kv, sq)
            tmp = qn
            qn = qn2
            qn2 = tmp
            tmp = kn
            kn = kn2
            kn2 = tmp
        else:
            _write(S, ld, dk, w, decay, kn, delta)
    if copy:
        for i in range(dk):
            memcpy(S0 + i * ld0, local + i * COLS, COLS * sizeof(float))


cdef void _delta_block(const float *q, Py_ssize_t qs, const float *k, Py_ssize_t ks,
                       const float *v, Py_ssize_t vs, const float *g, Py_ssize_t gs,
                       const float *beta, Py_ssize_t bs, float *S, Py_ssize_t ld,
                       float *out, Py_ssize_t os, Py_ssize_t n, Py_ssize_t dk, Py_ssize_t w,
                       float eps) noexcept nogil:
    """_delta_cols, compiled once for full blocks of the constant width COLS (fixed trip counts,
    so the compiler unrolls and keeps the accumulators in registers) and once for a narrower tail."""
    if w == COLS:
        _delta_cols(q, qs, k, ks, v, vs, g, gs, beta, bs, S, ld, out, os, n, dk, COLS, eps)
    else:
        _delta_cols(q, qs, k, ks, v, vs, g, gs, beta, bs, S, ld, out, os, n, dk, w, eps)


def gated_delta_rule_into(q, k, v, g, beta, state, out, double eps=1e-6, bint tiled=True, int threads=1):
    """The gated delta rule over n tokens (kernels/reference/deltanet.py gated_delta_rule):
    out[t, h] = S_t^T qn with S_t = exp(g) S_{t-1} + kn (x) beta (v - exp(g) S_{t-1}^T kn).

    q, k: float32[n, Hk, Dk]; v: float32[n, Hv, Dv]; g (log decay, <= 0), beta (after the
    sigmoid): float32[n, Hv]; state: float32[Hv, Dk, Dv], C-contiguous, updated in place;
    out: float32[n, Hv, Dv], C-contiguous. Hv % Hk == 0; value head h reads key head h % Hk
    (tiled: qwen35 GGUF order) or h // (Hv / Hk) (not tiled: qwen3next, Hugging Face).
    q, k, v, g, beta may be views with strided outer axes. Threads take (value head, 64-column
    block) items, each through every token, so any thread count gives the same bits."""
    fn = "gated_delta_rule_into"
    cdef const float[:, :, :] qm = _in3(q, fn, "q")
    cdef const float[:, :, :] km = _in3(k, fn, "k")
    cdef const float[:, :, :] vm = _in3(v, fn, "v")
    cdef const float[:, :] gm = _in2(g, fn, "g")
    cdef const float[:, :] bm = _in2(beta, fn, "beta")
    cdef float[:, :, ::1] sm = _out3c(state, fn, "state", "a writable C-contiguous float32[Hv, Dk, Dv] array")
    cdef float[:, :, ::1] om = _out3c(out, fn, "out", "a writable C-contiguous float32[n, Hv, Dv] array")
    cdef Py_ssize_t n = qm.shape[0], hk = qm.shape[1], dk = qm.shape[2]
    cdef Py_ssize_t hv = vm.shape[1], dv = vm.shape[2]
    if not (km.shape[0] == n and km.shape[1] == hk and km.shape[2] == dk):
        raise ValueError(f"{fn}: k is {_describe(k)}, q is [{n}, {hk}, {dk}]: they must match")
    if vm.shape[0] != n:
        raise ValueError(f"{fn}: v is {_describe(v)}, q has {n} tokens")
    if not (hk > 0 and hv % hk == 0):
        raise ValueError(f"{fn}: v has {hv} heads, q and k {hk}: need a multiple")
    if not (0 < dk <= MAX_D and 0 < dv <= MAX_D):
        raise ValueError(f"{fn}: head sizes Dk {dk}, Dv {dv}, need 1..{MAX_D}")
    if not (gm.shape[0] == n and gm.shape[1] == hv):
        raise ValueError(f"{fn}: g is {_describe(g)}, need [{n}, {hv}]")
    if not (bm.shape[0] == n and bm.shape[1] == hv):
        raise ValueError(f"{fn}: beta is {_describe(beta)}, need [{n}, {hv}]")
    if not (sm.shape[0] == hv and sm.shape[1] == dk and sm.shape[2] == dv):
        raise ValueError(f"{fn}: state is {_describe(state)}, need [{hv}, {dk}, {dv}] (Hv, Dk, Dv)")
    if not (om.shape[0] == n and om.shape[1] == hv and om.shape[2] == dv):
        raise ValueError(f"{fn}: out is {_describe(out)}, need [{n}, {hv}, {dv}]")
    if not (eps >= 0):
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    if threads < 1:
        raise ValueError(f"{fn}: threads must be >= 1, got {threads}")
    if n == 0:
        return
    cdef Py_ssize_t r = hv // hk, h, kh
    cdef Py_ssize_t qs = _floats(qm.strides[0]), qh = _floats(qm.strides[1])
    cdef Py_ssize_t ks = _floats(km.strides[0]), khs = _floats(km.strides[1])
    cdef Py_ssize_t vs = _floats(vm.strides[0]), vh = _floats(vm.strides[1])
    cdef Py_ssize_t gs = _floats(gm.strides[0]), gh = _floats(gm.strides[1])
    cdef Py_ssize_t bs = _floats(bm.strides[0]), bh = _floats(bm.strides[1])
    cdef Py_ssize_t os = hv * dv
    cdef const float *qp = &qm[0, 0, 0]
    cdef const float *kp = &km[0, 0, 0]
    cdef const float *vp = &vm[0, 0, 0]
    cdef const float *gp = &gm[0, 0]
    cdef const float *bp = &bm[0, 0]
    cdef float *sp = &sm[0, 0, 0]
    cdef float *op = &om[0, 0, 0]
    cdef float feps = <float>eps
    cdef Py_ssize_t nb = (dv + COLS - 1) // COLS, item, j0
    # a second thread is worth waking (a few microseconds) for >= 256 KiB of state work
    cdef int nt = threads if n * hv * dk * dv >= 65536 and hv * nb > 1 else 1
    # one work item: COLS columns of one value head, through every token
    for item in prange(hv * nb, nogil=True, num_threads=nt, schedule="static"):
        h = item // nb
        j0 = (item % nb) * COLS
        kh = h % hk if tiled else h // r
        _delta_block(qp + kh * qh, qs, kp + kh * khs, ks, vp + h * vh + j0, vs, gp + h * gh, gs,
                     bp + h * bh, bs, sp + h * dk * dv + j0, dv, op + h * dv + j0, os, n, dk,
                     min(COLS, dv - j0), feps)


# ---- gated RMSNorm -----------------------------------------------------------------------------
cdef void _gated_norm_row(const float *x, const float *w, const float *z, float *out, Py_ssize_t d,
                          double eps) noexcept nogil:
    """One row; out may be x or z (each element is read before it is written)."""
    cdef Py_ssize_t j
    cdef float scale = <float>(1.0 / sqrt(_dot(x, x, d) / d + eps))
    for j in range(d):
        out[j] = (x[j] * scale) * w[j] * _silu(z[j])


def gated_rms_norm_into(x, weight, z, double eps, out, int threads=1):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight * silu(z[i]) for each row i.

    x, z: float32[m, D] (one row per token and value head); weight: float32[D]; out: float32[m, D]
    (may be x or z). Threads split the rows."""
    fn = "gated_rms_norm_into"
    cdef const float[:, :] xv = _in2(x, fn, "x")
    cdef const float[:, :] zv = _in2(z, fn, "z")
    cdef float[:, :] ov = _out2(out, fn, "out")
    cdef const float[::1] wv
    if weight is None:
        raise _bad(fn, "weight", "a float32[D] array", weight)
    try:
        wv = weight
    except (ValueError, TypeError, BufferError) as e:
        raise _bad(fn, "weight", "a contiguous float32[D] array", weight, e) from None
    cdef Py_ssize_t m = xv.shape[0], d = xv.shape[1], i
    if wv.shape[0] != d:
        raise ValueError(f"{fn}: weight has {wv.shape[0]} values, rows of x have {d}")
    if not (zv.shape[0] == m and zv.shape[1] == d):
        raise ValueError(f"{fn}: z is {_describe(z)}, x is [{m}, {d}]")
    if not (ov.shape[0] == m and ov.shape[1] == d):
        raise ValueError(f"{fn}: out is {_describe(out)}, x is [{m}, {d}]")
    if threads < 1:
        raise ValueError(f"{fn}: threads must be >= 1, got {threads}")
    if m == 0 or d == 0:
        return
    cdef Py_ssize_t xs = _floats(xv.strides[0]), zs = _floats(zv.strides[0]), os = _floats(ov.strides[0])
    cdef const float *xp = &xv[0, 0]
    cdef const float *zp = &zv[0, 0]
    cdef const float *wp = &wv[0]
    cdef float *op = &ov[0, 0]
    cdef int nt = threads if m * d >= 65536 else 1
    for i in prange(m, nogil=True, num_threads=nt, schedule="static"):
        _gated_norm_row(xp + i * xs, wp, zp + i * zs, op + i * os, d, eps)
