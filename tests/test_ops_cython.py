"""weightstream.kernels._ops (the per-token small operations) against the NumPy versions in kernels/reference/ops.py.

They accumulate in double where NumPy sums float32 pairwise, so they agree to float32 rounding:
max |difference| below REL of the output's largest magnitude."""
import numpy as np
import pytest

from weightstream.kernels.reference.ops import ROPE_NEOX, ROPE_NORM
from weightstream.kernels.reference.ops import Rope, rms_norm, silu, softmax
from weightstream.kernels import _ops

REL = 2e-6


def close(got, ref, rel=REL):
    return np.abs(got - ref).max() <= rel * np.abs(ref).max()


@pytest.mark.parametrize("n,e", [(1, 576), (7, 64), (3, 4096)])
def test_rms_norm(n, e):
    rng = np.random.default_rng([n, e])
    x = rng.standard_normal((n, e), dtype=np.float32) * 3
    w = rng.standard_normal(e, dtype=np.float32)
    out = np.empty_like(x)
    _ops.rms_norm_into(x, w, 1e-5, out)
    assert close(out, rms_norm(x, w, 1e-5))
    _ops.rms_norm_into(x, w, 1e-5, x)  # in place
    assert np.array_equal(x, out)


@pytest.mark.parametrize("style", [ROPE_NORM, ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope(style, n_rot):
    rope = Rope(n_rot, 10000.0, 512, style)
    rng = np.random.default_rng(n_rot)
    x = rng.standard_normal((5, 9, 64), dtype=np.float32)
    positions = np.array([0, 1, 100, 511, 3])
    ref = rope(x, positions)
    _ops.rope_inplace(x, positions, rope.cos, rope.sin, n_rot, style == ROPE_NEOX)
    assert close(x, ref)


def test_swiglu_on_strided_halves():
    rng = np.random.default_rng(0)
    both = rng.standard_normal((3, 2 * 1536), dtype=np.float32) * 4
    gate, up = both[:, :1536], both[:, 1536:]  # views with a row stride of 2 * 1536
    out = np.empty((3, 1536), np.float32)
    _ops.swiglu_into(gate, up, out)
    assert close(out, silu(gate) * up)


@pytest.mark.parametrize("heads,kv_heads,n_kv,threads", [(9, 3, 1, 1), (9, 3, 37, 2), (32, 8, 500, 2), (4, 4, 200, 1)])
def test_attend_one(heads, kv_heads, n_kv, threads):
    hd, n_ctx = 64, 512
    rng = np.random.default_rng([heads, n_kv])
    q = rng.standard_normal((heads, hd), dtype=np.float32)
    k_cache = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    v_cache = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    scale = np.float32(hd ** -0.5)
    out = np.empty((heads, hd), np.float32)
    _ops.attend_one(q, k_cache, v_cache, n_kv, scale, out, np.empty((heads, n_ctx), np.float32), threads)
    g = heads // kv_heads
    keys = np.repeat(k_cache[:n_kv], g, axis=1).transpose(1, 0, 2)  # [heads, n_kv, hd]
    values = np.repeat(v_cache[:n_kv], g, axis=1).transpose(1, 0, 2)
    probs = softmax(np.einsum("hd,htd->ht", q, keys) * scale)
    assert close(out, np.einsum("ht,htd->hd", probs, values), 1e-5)


@pytest.mark.parametrize("hd", [64, 128, 256])
def test_attend_one_head_by_head_is_grouped(hd):
    """attend_one with more threads than kv heads goes head by head (ws_attend_head), with fewer by
    kv head (ws_attend_group, each kv head's keys once for its query heads): the same bits."""
    heads, kv_heads, n_kv, n_ctx = 8, 2, 300, 320  # 300 keys x 8 heads x hd: threaded
    rng = np.random.default_rng(hd)
    q = rng.standard_normal((heads, hd), dtype=np.float32)
    kc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    vc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    outs = []
    for threads in (1, 3):
        out = np.empty((heads, hd), np.float32)
        _ops.attend_one(q, kc, vc, n_kv, 0.1, out, np.empty((heads, n_ctx), np.float32), threads)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="rms_norm_into: weight has 3 values"):
        _ops.rms_norm_into(np.zeros((1, 4), np.float32), np.zeros(3, np.float32), 1e-5, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="position 600 outside"):
        rope = Rope(8, 10000.0, 512, ROPE_NEOX)
        _ops.rope_inplace(np.zeros((1, 1, 8), np.float32), np.array([600]), rope.cos, rope.sin, 8, True)
    with pytest.raises(ValueError, match="n_kv 513 for a cache of 512"):
        _ops.attend_one(np.zeros((2, 8), np.float32), np.zeros((512, 1, 8), np.float32), np.zeros((512, 1, 8), np.float32),
                        513, 1.0, np.zeros((2, 8), np.float32), np.zeros((2, 513), np.float32))


@pytest.mark.parametrize("n,e", [(1, 128), (4, 512), (3, 8)])
def test_softmax_rows(n, e):
    rng = np.random.default_rng([n, e, 1])
    x = rng.standard_normal((n, e), dtype=np.float32) * 4
    out = np.empty_like(x)
    _ops.softmax_rows_into(x, out)
    assert close(out, softmax(x))
    _ops.softmax_rows_into(x, x)  # in place (the router's logits become its probabilities)
    assert np.array_equal(x, out)


def test_softmax_row_with_a_nan_is_all_nan():
    x = np.array([[0.5, np.nan, 1.0], [0.5, 2.0, 1.0]], dtype=np.float32)
    out = np.empty_like(x)
    _ops.softmax_rows_into(x, out)
    assert np.isnan(out[0]).all() and close(out[1], softmax(x[1:])[0])


@pytest.mark.parametrize("e,k,norm", [(128, 8, True), (512, 10, False), (8, 8, True), (60, 1, False)])
def test_topk_is_a_stable_descending_argsort_cut_at_k(e, k, norm):
    rng = np.random.default_rng([e, k])
    probs = softmax(np.round(rng.standard_normal((16, e), dtype=np.float32), 1))  # rounded: many ties
    ids, weights = np.empty((16, k), np.int64), np.empty((16, k), np.float32)
    _ops.topk_weights_into(probs, ids, weights, norm)
    ref_ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    assert np.array_equal(ids, ref_ids)
    ref = np.take_along_axis(probs, ref_ids, axis=-1)
    if norm:
        ref = ref / ref.sum(axis=-1, keepdims=True)
    assert np.allclose(weights, ref, rtol=1e-6, atol=0)


def test_topk_ranks_nan_last_and_takes_given_ids():
    probs = np.array([[0.1, np.nan, 0.5, 0.5, 0.2]], dtype=np.float32)
    ids, weights = np.empty((1, 5), np.int64), np.empty((1, 5), np.float32)
    _ops.topk_weights_into(probs, ids, weights, False)
    assert ids.tolist() == [[2, 3, 4, 0, 1]] == np.argsort(-probs, kind="stable").tolist()
    given = np.array([[4, 0]], dtype=np.int64)  # a routing source's choice: kept, weights gathered
    w2 = np.empty((1, 2), np.float32)
    _ops.topk_weights_into(probs, given, w2, True, False)
    assert given.tolist() == [[4, 0]] and np.allclose(w2, [[0.2 / 0.3, 0.1 / 0.3]])
    with pytest.raises(ValueError, match=r"expert id 5 \(row 0\) outside \[0, 5\)"):
        _ops.topk_weights_into(probs, np.array([[5, 0]], dtype=np.int64), w2, True, False)
    with pytest.raises(ValueError, match="k = 6 experts of 5"):
        _ops.topk_weights_into(probs, np.empty((1, 6), np.int64), np.empty((1, 6), np.float32), True)


def attention_by_calls(qkv, heads, kv_heads, hd, gated, q_norm, k_norm, full, pos, rope, neox, kc, vc, scale):
    """The per-call decode path attention_decode replaces: rms_norm_into, rope_inplace,
    attend_one and NumPy's sigmoid, one after the other."""
    qw = (2 if gated else 1) * hd
    q = np.ascontiguousarray(qkv[0, :heads * qw].reshape(heads, qw)[:, :hd])
    k = qkv[0, heads * qw:heads * qw + kv_heads * hd].reshape(kv_heads, hd).copy()
    kc[pos], vc[pos] = k, qkv[0, heads * qw + kv_heads * hd:].reshape(kv_heads, hd)
    if q_norm is not None:
        shape = (1, heads * hd) if full else (heads, hd)
        _ops.rms_norm_into(q.reshape(shape), q_norm, 1e-6, q.reshape(shape))
        shape = (1, kv_heads * hd) if full else (kv_heads, hd)
        _ops.rms_norm_into(kc[pos].reshape(shape), k_norm, 1e-6, kc[pos].reshape(shape))
    p = np.array([pos])
    _ops.rope_inplace(q[None], p, rope.cos, rope.sin, rope.n_rot, neox)
    _ops.rope_inplace(kc[pos][None], p, rope.cos, rope.sin, rope.n_rot, neox)
    out = np.empty((heads, hd), np.float32)
    _ops.attend_one(q, kc, vc, pos + 1, scale, out, np.empty((heads, 64), np.float32))
    if gated:
        out = out * (1 / (1 + np.exp(-qkv[0, :heads * qw].reshape(heads, qw)[:, hd:])))
    return out


@pytest.mark.parametrize("gated,norm,neox", [(False, None, False), (False, "head", True),
                                             (True, "head", True), (False, "full", True)])
@pytest.mark.parametrize("heads,kv_heads,threads", [(8, 2, 1), (4, 4, 2)])
def test_attention_decode_is_the_per_call_path(gated, norm, neox, heads, kv_heads, threads):
    hd, pos, n_ctx = 32, 9, 16
    rng = np.random.default_rng([heads, kv_heads, threads, gated, neox])
    rope = Rope(16, 10000.0, n_ctx, ROPE_NEOX if neox else ROPE_NORM)  # partial rotary: 16 of 32
    qkv = rng.standard_normal((1, (2 if gated else 1) * heads * hd + 2 * kv_heads * hd), dtype=np.float32)
    full = norm == "full"
    q_norm = None if norm is None else rng.standard_normal((heads if full else 1) * hd, dtype=np.float32)
    k_norm = None if norm is None else rng.standard_normal((kv_heads if full else 1) * hd, dtype=np.float32)
    kc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    vc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    kc2, vc2 = kc.copy(), vc.copy()
    ref = attention_by_calls(qkv.copy(), heads, kv_heads, hd, gated, q_norm, k_norm, full, pos, rope, neox, kc2, vc2, 0.2)
    q, out = np.empty((heads, hd), np.float32), np.empty((heads, hd), np.float32)
    _ops.attention_decode(qkv, heads, kv_heads, gated, q_norm, k_norm, full, 1e-6, pos, rope.cos, rope.sin,
                          16, neox, kc, vc, 0.2, q, out, np.empty((heads, n_ctx), np.float32), threads)
    assert np.array_equal(kc, kc2) and np.array_equal(vc, vc2)  # the cache row: the same bits
    if gated:  # the gate's sigmoid: this module's exp against NumPy's
        assert close(out, ref)
    else:
        assert np.array_equal(out, ref)


def test_attention_decode_names_bad_shapes():
    kc = np.zeros((4, 2, 8), np.float32)
    rope = Rope(8, 10000.0, 4, ROPE_NEOX)
    args = dict(q=np.empty((4, 8), np.float32), out=np.empty((4, 8), np.float32), scratch=np.empty((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"qkv is \[1, 60\], need \[1, 64\]"):
        _ops.attention_decode(np.zeros((1, 60), np.float32), 4, 2, False, None, None, False, 1e-6, 0,
                              rope.cos, rope.sin, 8, True, kc, kc.copy(), 1.0, **args)
    with pytest.raises(ValueError, match="position 4 outside the cache"):
        _ops.attention_decode(np.zeros((1, 64), np.float32), 4, 2, False, None, None, False, 1e-6, 4,
                              rope.cos, rope.sin, 8, True, kc, kc.copy(), 1.0, **args)
    with pytest.raises(ValueError, match="q_norm has 5 values, need 8"):
        _ops.attention_decode(np.zeros((1, 64), np.float32), 4, 2, False, np.ones(5, np.float32),
                              np.ones(8, np.float32), False, 1e-6, 0, rope.cos, rope.sin, 8, True, kc,
                              kc.copy(), 1.0, **args)


@pytest.mark.parametrize("heads,kv_heads,threads", [(8, 2, 1), (4, 4, 2), (6, 3, 3)])
@pytest.mark.parametrize("hd,start", [(32, 5), (128, 60), (256, 25), (40, 70), (20, 3)])
def test_attend_causal_is_attend_one_per_token(heads, kv_heads, threads, hd, start):
    """Prefill attention: each (token, head) == attend_one at that token's position, bit for bit,
    and == NumPy's masked softmax attention to float rounding. The head sizes take every path of
    ws_attend_group (whole SIMD passes of 8 or 4 vectors, 40: SIMD scores but a per-dimension
    weighted sum, 20: neither); the positions cross its blocks of keys (32 or 16 keys of K, 64 of V)."""
    n = 7
    n_ctx = start + n + 2
    rng = np.random.default_rng([heads, kv_heads, threads, hd])
    q = rng.standard_normal((n, heads, hd), dtype=np.float32)
    kc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    vc = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    positions = np.arange(start, start + n, dtype=np.int64)
    out = np.empty_like(q)
    g = heads // kv_heads
    _ops.attend_causal(q, kc, vc, positions, 0.3, out, np.empty((threads * g, n_ctx), np.float32), threads)
    for i, p in enumerate(positions):
        one = np.empty((heads, hd), np.float32)
        _ops.attend_one(q[i], kc, vc, p + 1, 0.3, one, np.empty((heads, n_ctx), np.float32))
        assert np.array_equal(out[i], one)
        keys, values = np.repeat(kc[:p + 1], g, axis=1), np.repeat(vc[:p + 1], g, axis=1)  # [T, heads, hd]
        probs = softmax(np.einsum("hd,thd->ht", q[i], keys) * np.float32(0.3))
        assert close(out[i], np.einsum("ht,thd->hd", probs, values))


def test_attend_causal_names_bad_input():
    q = np.zeros((2, 4, 8), np.float32)
    kc = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="position 4 outside the cache's 4"):
        _ops.attend_causal(q, kc, kc.copy(), np.array([3, 4]), 1.0, q.copy(), np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match=r"scratch \[1, 2\] < \[4, 4\] \(2 threads x 2 heads a kv head\)"):
        _ops.attend_causal(q, kc, kc.copy(), np.array([2, 3]), 1.0, q.copy(), np.zeros((1, 2), np.float32), 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_moe_combine_is_numpys_sum_term_by_term(threads):
    """out[t] = sum_j w[t, j] * y[rows[t, j]], each product rounded before it is added, j in
    order: NumPy's `out[t] += w * y` bits (the prefill MoE sum), with rows from a permutation."""
    rng = np.random.default_rng(11)
    n, k, e = 37, 4, 96
    y = rng.standard_normal((n * k, e)).astype(np.float32)
    rows = rng.permutation(n * k).reshape(n, k)
    w = rng.random((n, k)).astype(np.float32)
    expected = np.zeros((n, e), np.float32)
    for j in range(k):
        expected += w[:, j:j + 1] * y[rows[:, j]]
    out = np.full((n, e), np.nan, np.float32)
    _ops.moe_combine_into(y.copy(), rows, w, out, threads)
    assert np.array_equal(out, expected)


def test_moe_combine_names_bad_rows():
    y, out = np.zeros((6, 8), np.float32), np.zeros((3, 8), np.float32)
    w = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="row 6"):
        _ops.moe_combine_into(y, np.array([[0, 1], [2, 3], [4, 6]]), w, out)
    with pytest.raises(ValueError, match="second term"):
        _ops.moe_combine_into(y, np.array([[0, 1], [2, 3], [4, 1]]), w, out)
    with pytest.raises(ValueError, match="out"):
        _ops.moe_combine_into(y, np.array([[0, 1], [2, 3], [4, 5]]), w, np.zeros((3, 9), np.float32))


def test_sigmoid_gate_rows_match_numpy_and_take_strided_gates():
    """out *= sigmoid(gate) per row, the gate a strided view (each head's half of [q; gate]):
    within float rounding of NumPy's sigmoid (this module's exp), NaN kept; shapes checked."""
    rng = np.random.default_rng(5)
    qg = rng.standard_normal((6, 3, 2 * 32)).astype(np.float32) * 8
    qg[2, 1, 40] = np.nan
    gate = qg[:, :, 32:].reshape(18, 32)
    out = rng.standard_normal((18, 32)).astype(np.float32)
    want = out * (np.float32(1) / (np.float32(1) + np.exp(-gate)))
    _ops.sigmoid_gate_into(out, qg.reshape(18, 64)[:, 32:])
    assert np.allclose(out, want, rtol=1e-6, atol=1e-30, equal_nan=True) and np.isnan(out[7, 8])
    with pytest.raises(ValueError, match=r"out \[18, 32\], gate \[18, 31\]"):
        _ops.sigmoid_gate_into(out, gate[:, :31])
