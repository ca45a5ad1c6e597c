"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention): weightstream.kernels._deltanet against the
NumPy references of kernels/reference/deltanet.py, the references against each other (chunked ==
recurrent) and against transformers' PyTorch versions.

Tolerance: the kernels add in another order than NumPy (the recurrence reads S^T q from the state
before the update, and sums the norms in double), so results agree to float32 rounding grown over
the sequence, not bit for bit: assert_allclose with rtol 1e-4, atol 1e-5 on outputs and final
state, whose magnitudes here are about 0.1 to 10.
"""
import numpy as np
import pytest

from weightstream.kernels import _deltanet
from weightstream.kernels.reference import deltanet as ref

RTOL, ATOL = 1e-4, 1e-5


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def inputs(seed, n, hk, hv, dk, dv, state_scale=1.0):
    """q, k, v, g, beta, state at the scales of a real layer: g = -exp(A_log) * softplus(.) is a
    log decay in about [-3, 0); beta = sigmoid(.); the state a previous sequence left behind."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, hk, dk), dtype=np.float32)
    k = rng.standard_normal((n, hk, dk), dtype=np.float32)
    v = rng.standard_normal((n, hv, dv), dtype=np.float32)
    g = -rng.uniform(0.0, 3.0, (n, hv)).astype(np.float32) ** 2 / 3  # mostly near 0: long memory
    beta = (1 / (1 + np.exp(-rng.standard_normal((n, hv))))).astype(np.float32)
    state = (rng.standard_normal((hv, dk, dv)) * state_scale).astype(np.float32)
    return q, k, v, g, beta, state


def run_kernel(q, k, v, g, beta, state, tiled, threads=1, eps=1e-6):
    """_deltanet.gated_delta_rule_into on a copy of state: (out, final state)."""
    s = state.copy()
    out = np.full((q.shape[0],) + v.shape[1:], np.nan, np.float32)
    _deltanet.gated_delta_rule_into(q, k, v, g, beta, s, out, eps, tiled, threads)
    return out, s


def run_ref(fn, q, k, v, g, beta, state, tiled, **kw):
    s = state.copy()
    return fn(q, k, v, g, beta, s, 1e-6, tiled, **kw), s


# (n, Hk, Hv, Dk, Dv): decode and prefill; Hk == Hv and Hk != Hv; Dv a multiple of the kernel's
# 64-column blocks, below one block, and with a tail (96); Dk past the 128 rows a prefill's block
# copies (160); the two real Qwen3.5 head layouts at n = 1
SHAPES = [(1, 2, 4, 16, 16), (200, 2, 4, 16, 16), (200, 2, 6, 32, 32), (200, 3, 3, 32, 16),
          (1, 4, 4, 128, 128), (200, 2, 4, 128, 128), (37, 2, 4, 64, 96), (30, 1, 2, 160, 128),
          (1, 16, 32, 128, 128), (1, 16, 64, 128, 128)]


# ---- the recurrence ----------------------------------------------------------------------------
@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("n,hk,hv,dk,dv", SHAPES)
def test_kernel_matches_reference(n, hk, hv, dk, dv, tiled):
    args = inputs([n, hk, hv, dk, dv], n, hk, hv, dk, dv)
    want, want_state = run_ref(ref.gated_delta_rule, *args, tiled)
    for threads in (1, 2):
        out, state = run_kernel(*args, tiled, threads)
        close(out, want)
        close(state, want_state)


def test_threads_give_the_same_bits():
    """Each (head, column block) is one thread's work in a fixed order."""
    args = inputs(5, 50, 2, 8, 64, 128)
    a, sa = run_kernel(*args, True, 1)
    b, sb = run_kernel(*args, True, 2)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)


@pytest.mark.parametrize("tiled", [True, False])
def test_head_mapping(tiled):
    """Value head h reads key head h % Hk (tiled) or h // (Hv / Hk): each head run on its own
    (Hk = Hv = 1) equals the grouped run, in the reference and the kernel."""
    n, hk, hv, d = 9, 2, 6, 16
    q, k, v, g, beta, state = inputs(7, n, hk, hv, d, d)
    out, final = run_ref(ref.gated_delta_rule, q, k, v, g, beta, state, tiled)
    kout, kfinal = run_kernel(q, k, v, g, beta, state, tiled)
    for h in range(hv):
        kh = h % hk if tiled else h // (hv // hk)
        one, s1 = run_ref(ref.gated_delta_rule, q[:, kh:kh + 1], k[:, kh:kh + 1], v[:, h:h + 1], g[:, h:h + 1],
                          beta[:, h:h + 1], state[h:h + 1], tiled)
        close(out[:, h], one[:, 0])
        close(final[h], s1[0])
        close(kout[:, h], one[:, 0])
        close(kfinal[h], s1[0])
    assert not np.allclose(out, run_ref(ref.gated_delta_rule, q, k, v, g, beta, state, not tiled)[0])


@pytest.mark.parametrize("dk,dv", [(128, 128), (64, 96), (160, 64)])
def test_prefill_equals_token_by_token_decode(dk, dv):
    """A prompt in one call (each 64-column block on a contiguous copy of the state, the sweep
    fused with the next token's reads) gives the bits of one call per token (in place, read then
    write): the same operations per element in the same order."""
    q, k, v, g, beta, state = inputs(21, 24, 2, 4, dk, dv)
    want, want_state = run_kernel(q, k, v, g, beta, state, True, 2)
    s = state.copy()
    got = np.empty_like(want)
    for t in range(24):
        _deltanet.gated_delta_rule_into(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], s,
                                        got[t:t + 1], 1e-6, True, 1)
    assert np.array_equal(got, want) and np.array_equal(s, want_state)


@pytest.mark.parametrize("split", [1, 77, 199])
def test_two_calls_equal_one(split):
    """The state carries a sequence across calls: prefill in pieces, or prefill then decode."""
    q, k, v, g, beta, state = inputs(11, 200, 2, 4, 32, 64)
    want, want_state = run_kernel(q, k, v, g, beta, state, True)
    rwant, rwant_state = run_ref(ref.gated_delta_rule, q, k, v, g, beta, state, True)
    s = state.copy()
    parts, rparts, rs = [], [], state.copy()
    for sl in (slice(0, split), slice(split, 200)):
        out = np.empty((sl.stop - sl.start, 4, 64), np.float32)
        _deltanet.gated_delta_rule_into(q[sl], k[sl], v[sl], g[sl], beta[sl], s, out, 1e-6, True, 2)
        parts.append(out)
        rparts.append(ref.gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl], rs, 1e-6, True))
    close(np.concatenate(parts), want)
    close(s, want_state)
    close(np.concatenate(rparts), rwant)
    close(rs, rwant_state)


def test_strided_views():
    """q, k, v as views into one [n, 2 Hk Dk + Hv Dv] buffer (the conv's output), g and beta as
    columns of a wider array: the same result as contiguous copies."""
    n, hk, hv, dk, dv = 20, 2, 4, 32, 64
    q, k, v, g, beta, state = inputs(3, n, hk, hv, dk, dv)
    mixed = np.concatenate([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], axis=1)
    gb = np.concatenate([g, beta], axis=1)
    qv = mixed[:, :hk * dk].reshape(n, hk, dk)
    kv = mixed[:, hk * dk:2 * hk * dk].reshape(n, hk, dk)
    vv = mixed[:, 2 * hk * dk:].reshape(n, hv, dv)
    assert not qv.flags.c_contiguous and np.shares_memory(qv, mixed)
    out, s = run_kernel(qv, kv, vv, gb[:, :hv], gb[:, hv:], state, False)
    want, want_state = run_kernel(q, k, v, g, beta, state, False)
    assert np.array_equal(out, want) and np.array_equal(s, want_state)


def test_n_zero_is_a_no_op():
    q, k, v, g, beta, state = inputs(1, 0, 1, 2, 16, 16)
    out, s = run_kernel(q, k, v, g, beta, state, True)
    assert out.shape == (0, 2, 16) and np.array_equal(s, state)


# ---- the chunked form --------------------------------------------------------------------------
@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("n,chunk", [(1, 64), (63, 64), (64, 64), (65, 64), (200, 64), (200, 16)])
def test_chunked_equals_recurrent(n, chunk, tiled):
    args = inputs([n, chunk], n, 2, 4, 32, 48, state_scale=2.0)  # a non-zero starting state
    want, want_state = run_ref(ref.gated_delta_rule, *args, tiled)
    got, got_state = run_ref(ref.chunk_gated_delta_rule, *args, tiled, chunk=chunk)
    close(got, want)
    close(got_state, want_state)


def test_chunked_with_strong_decay():
    """g far below 0 (a head that forgets within a few tokens): the cumulative decays underflow
    to 0 inside a chunk without inf or nan."""
    q, k, v, g, beta, state = inputs(2, 130, 1, 2, 16, 16)
    g = g * 20
    want, want_state = run_ref(ref.gated_delta_rule, q, k, v, g, beta, state, True)
    got, got_state = run_ref(ref.chunk_gated_delta_rule, q, k, v, g, beta, state, True)
    assert np.isfinite(got).all()
    close(got, want)
    close(got_state, want_state)


# ---- against transformers (PyTorch) ------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    return torch, mod


@pytest.mark.parametrize("n,hk,hv", [(1, 2, 4), (100, 2, 4), (130, 3, 3)])
def test_reference_matches_transformers(hf, n, hk, hv):
    """torch_recurrent_gated_delta_rule and torch_chunk_gated_delta_rule (batch 1, qk l2norm in
    the kernel, eps 1e-6) use repeat_interleave for the heads: tiled=False."""
    torch, mod = hf
    dk, dv = 32, 64
    q, k, v, g, beta, state = inputs([n, hv], n, hk, hv, dk, dv)
    t = [torch.from_numpy(a)[None] for a in (q, k, v, g, beta)]
    s0 = torch.from_numpy(state)[None]
    want, want_state = run_ref(ref.gated_delta_rule, q, k, v, g, beta, state, False)
    kout, kstate = run_kernel(q, k, v, g, beta, state, False)
    for fn in (mod.torch_recurrent_gated_delta_rule, mod.torch_chunk_gated_delta_rule):
        out, final = fn(*t, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        out, final = out[0].numpy(), final[0].numpy()
        close(want, out)
        close(want_state, final)
        close(kout, out)
        close(kstate, final)


@pytest.mark.parametrize("n", [1, 50])
def test_conv1d_matches_torch(hf, n):
    """From a zero state, conv1d_silu is torch's conv1d with groups=C and K-1 zeros of left
    padding (padding=K-1, first n outputs); from a state, conv1d over concat(state, x)."""
    torch, _ = hf
    C, K = 80, 4
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, C), dtype=np.float32)
    w = rng.standard_normal((C, K), dtype=np.float32)
    tw = torch.from_numpy(w)[:, None, :]  # [C, 1, K]
    conv = torch.nn.functional.conv1d(torch.from_numpy(x.T.copy())[None], tw, groups=C, padding=K - 1)
    want = torch.nn.functional.silu(conv[0, :, :n]).numpy().T
    state = np.zeros((K - 1, C), np.float32)
    close(ref.conv1d_silu(x, state.copy(), w), want)
    out = np.empty_like(x)
    _deltanet.conv1d_silu_into(x, state, w, out, 2)
    close(out, want)

    state = rng.standard_normal((K - 1, C), dtype=np.float32)
    xx = np.concatenate([state, x]).T.copy()
    conv = torch.nn.functional.conv1d(torch.from_numpy(xx)[None], tw, groups=C)
    want = torch.nn.functional.silu(conv)[0].numpy().T
    _deltanet.conv1d_silu_into(x, state, w, out, 1)
    close(out, want)


# ---- conv1d + SiLU -----------------------------------------------------------------------------
# C = 12288: Qwen3.5-397B's q, k and v channels; 200 = 3 full blocks of 64 + a tail; K = 4 has its
# own compiled path for full blocks
@pytest.mark.parametrize("n,C,K", [(1, 12288, 4), (1, 200, 4), (2, 70, 4), (200, 200, 4), (300, 64, 2),
                                   (5, 33, 1), (9, 128, 7)])
def test_conv1d_matches_reference(n, C, K):
    rng = np.random.default_rng([n, C, K])
    x = rng.standard_normal((n, C), dtype=np.float32)
    w = rng.standard_normal((C, K), dtype=np.float32)
    state = rng.standard_normal((K - 1, C), dtype=np.float32)
    want_state = state.copy()
    want = ref.conv1d_silu(x, want_state, w)
    for threads in (1, 2):
        s = state.copy()
        out = np.full_like(x, np.nan)
        _deltanet.conv1d_silu_into(x, s, w, out, threads)
        close(out, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(s, want_state)  # the last K-1 inputs, copied


def test_conv1d_in_place_and_in_pieces():
    """out may be x; two calls (state carried) equal one, including pieces shorter than K-1."""
    rng = np.random.default_rng(0)
    n, C, K = 40, 130, 4
    x = rng.standard_normal((n, C), dtype=np.float32)
    w = rng.standard_normal((C, K), dtype=np.float32)
    state = rng.standard_normal((K - 1, C), dtype=np.float32)
    want_state = state.copy()
    want = ref.conv1d_silu(x, want_state, w)
    y, s = x.copy(), state.copy()
    _deltanet.conv1d_silu_into(y, s, w, y, 2)
    close(y, want, rtol=1e-5, atol=1e-6)
    s = state.copy()
    pieces = []
    for a, b in ((0, 1), (1, 3), (3, 40)):
        out = np.empty((b - a, C), np.float32)
        _deltanet.conv1d_silu_into(x[a:b], s, w, out, 1)
        pieces.append(out)
    close(np.concatenate(pieces), want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(s, want_state)


def test_conv1d_strided_rows():
    """x and out as column slices of wider arrays (rows contiguous, row stride larger)."""
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((30, 300), dtype=np.float32)
    x = wide[:, 10:110]
    w = rng.standard_normal((100, 4), dtype=np.float32)
    state = np.zeros((3, 100), np.float32)
    want = ref.conv1d_silu(x, state.copy(), w)
    out_wide = np.zeros((30, 250), np.float32)
    _deltanet.conv1d_silu_into(x, state, w, out_wide[:, 50:150], 2)
    close(out_wide[:, 50:150], want, rtol=1e-5, atol=1e-6)
    assert not out_wide[:, :50].any() and not out_wide[:, 150:].any()


# ---- gated RMSNorm -----------------------------------------------------------------------------
@pytest.mark.parametrize("m,d", [(1, 128), (64, 128), (600, 128), (3, 100)])
def test_gated_rms_norm(m, d):
    rng = np.random.default_rng([m, d])
    x = rng.standard_normal((m, d), dtype=np.float32) * 3
    z = rng.standard_normal((m, d), dtype=np.float32) * 2
    w = rng.standard_normal(d, dtype=np.float32)
    want = ref.gated_rms_norm(x, w, z, 1e-6)
    # the definition, independently of rms_norm / silu
    xd, zd = x.astype(np.float64), z.astype(np.float64)
    exact = xd / np.sqrt(np.mean(xd * xd, axis=1, keepdims=True) + 1e-6) * w * zd / (1 + np.exp(-zd))
    close(want, exact, rtol=1e-5, atol=1e-5)
    for threads in (1, 2):
        out = np.empty_like(x)
        _deltanet.gated_rms_norm_into(x, w, z, 1e-6, out, threads)
        close(out, want, rtol=1e-5, atol=1e-6)
    y = x.copy()
    _deltanet.gated_rms_norm_into(y, w, z, 1e-6, y, 1)  # in place
    assert np.array_equal(y, out)


def test_silu_over_the_float_range():
    """The kernels' SiLU (an exp in arithmetic, so it vectorises) against float64, through
    gated_rms_norm_into with x = 1 (out = silu(z) / sqrt(1 + eps)): within 3e-7 relative
    where e^-|z| is a normal float, and tiny (not inf or nan) far below."""
    z = np.concatenate([np.linspace(-120, 100, 200_001), [-1e7, -3e5, 3e5, 1e7]]).astype(np.float32)[None]
    out = np.empty_like(z)
    _deltanet.gated_rms_norm_into(np.ones_like(z), np.ones(z.shape[1], np.float32), z, 0.0, out, 1)
    zd = z.astype(np.float64)
    exact = zd * np.exp(-np.logaddexp(0, -zd))  # z sigmoid(z) without overflow
    normal = np.abs(zd) < 87
    assert (np.abs(out - exact)[normal] <= 3e-7 * np.abs(exact[normal]) + 1e-37).all()
    far = ~normal
    assert np.isfinite(out).all()
    assert (np.abs(out - exact)[far] <= 1e-6 * np.maximum(1, np.abs(exact[far]))).all()


# ---- argument checks ---------------------------------------------------------------------------
def _delta_args():
    q, k, v, g, beta, state = inputs(0, 3, 2, 4, 16, 32)
    return dict(q=q, k=k, v=v, g=g, beta=beta, state=state, out=np.empty((3, 4, 32), np.float32))


def _call_delta(a):
    _deltanet.gated_delta_rule_into(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], a["out"], 1e-6, True, 1)


@pytest.mark.parametrize("name,bad", [
    ("k", np.zeros((3, 2, 8), np.float32)),
    ("k", np.zeros((3, 2, 16), np.float64)),
    ("v", np.zeros((4, 4, 32), np.float32)),
    ("v", np.zeros((3, 3, 32), np.float32)),  # 3 value heads over 2 key heads
    ("g", np.zeros((3, 2), np.float32)),
    ("beta", np.zeros((3, 4, 1), np.float32)),
    ("state", np.zeros((4, 32, 16), np.float32)),
    ("state", np.zeros((4, 32, 16), np.float32).transpose(0, 2, 1)),  # right shape, not C-contiguous
    ("state", None),
    ("out", np.zeros((3, 4, 16), np.float32)),
    ("q", np.zeros((3, 2, 32), np.float32)[:, :, ::2]),  # rows not contiguous
])
def test_delta_rule_bad_arguments(name, bad):
    a = _delta_args()
    a[name] = bad
    with pytest.raises(ValueError, match=rf"gated_delta_rule_into: {name}\b"):
        _call_delta(a)


def test_delta_rule_read_only_state():
    a = _delta_args()
    a["state"].setflags(write=False)
    with pytest.raises(ValueError, match="state"):
        _call_delta(a)


@pytest.mark.parametrize("name,bad", [
    ("x", np.zeros((5, 10), np.float64)),
    ("conv_state", np.zeros((2, 10), np.float32)),
    ("conv_state", np.zeros((3, 11), np.float32)),
    ("weight", np.zeros((11, 4), np.float32)),
    ("weight", np.zeros((10, 17), np.float32)),
    ("out", np.zeros((4, 10), np.float32)),
])
def test_conv1d_bad_arguments(name, bad):
    a = dict(x=np.zeros((5, 10), np.float32), conv_state=np.zeros((3, 10), np.float32),
             weight=np.zeros((10, 4), np.float32), out=np.zeros((5, 10), np.float32))
    a[name] = bad
    with pytest.raises(ValueError, match=rf"conv1d_silu_into: {name}\b"):
        _deltanet.conv1d_silu_into(a["x"], a["conv_state"], a["weight"], a["out"], 1)


@pytest.mark.parametrize("name,bad", [
    ("x", np.zeros((5, 8, 1), np.float32)),
    ("weight", np.zeros(7, np.float32)),
    ("z", np.zeros((5, 7), np.float32)),
    ("out", np.zeros((5, 8), np.float64)),
])
def test_gated_rms_norm_bad_arguments(name, bad):
    a = dict(x=np.zeros((5, 8), np.float32), weight=np.ones(8, np.float32), z=np.zeros((5, 8), np.float32),
             out=np.zeros((5, 8), np.float32))
    a[name] = bad
    with pytest.raises(ValueError, match=rf"gated_rms_norm_into: {name}\b"):
        _deltanet.gated_rms_norm_into(a["x"], a["weight"], a["z"], 1e-6, a["out"], 1)
