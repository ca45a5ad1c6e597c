"""The fused decode-step MoE call (kernels/_kquants.pyx moe_decode_into; engine/model/forward.py
fused_experts): every routed expert's gate/up, SwiGLU, down and the weighted sum in one native
call. Its arithmetic is the per-expert path's (the same row kernels, the same SwiGLU, each
weighted product rounded before it is added, in ascending expert id), so the tests ask for the
same bits, from the kernel up to the logits, resident and streamed under every cache policy."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.engine import Engine
from weightstream.engine.model.forward import Model
from weightstream.engine.tools.synth import Preset, synth_model
from weightstream.kernels import QTensor, _kquants, _legacy, _ops, dequantize
from weightstream.kernels.backends import KernelCache
from weightstream.kernels.quantize_weights import quantize

E, FF = 512, 256  # model width, expert width: multiples of the k-quants' 256


def expert_weights(qtype, k: int, rng) -> tuple[list, list, list]:
    """k experts' (gate, up, down) as quantized block rows: uint8[rows, row_bytes]."""
    def q(rows, cols):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype)
    return [q(FF, E) for _ in range(k)], [q(FF, E) for _ in range(k)], [q(E, FF) for _ in range(k)]


def per_expert_path(h, gates, ups, downs, tg, td, weights, threads):
    """What forward.py's expert_batch and moe() sum do: two batched calls, SwiGLU, then
    out += y * w per expert in order."""
    k = len(gates)
    gu = np.empty((2 * k, FF), np.float32)
    _kquants.matvec_many_into(np.repeat(h, 2 * k, axis=0), list(gates) + list(ups), int(tg), gu, threads)
    act = np.empty((k, FF), np.float32)
    _ops.swiglu_into(gu[:k], gu[k:], act)
    y = np.empty((k, E), np.float32)
    _kquants.matvec_many_into(act, list(downs), int(td), y, threads)
    out = np.zeros((1, E), np.float32)
    for t in range(k):
        out += np.multiply(y[t:t + 1], weights[t], out=y[t:t + 1])
    return out


@pytest.mark.parametrize("tg,td", [(T.Q2_K, T.Q2_K), (T.Q4_K, T.Q6_K), (T.Q3_K, T.Q5_K)])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_call_gives_the_per_expert_paths_bits(tg, td, k, threads):
    rng = np.random.default_rng(k * 100 + int(tg))
    gates, ups, downs = expert_weights(tg, k, rng)
    downs = expert_weights(td, k, rng)[2]
    h = rng.standard_normal((1, E)).astype(np.float32)
    weights = rng.random(k).astype(np.float32)
    out, y = np.empty((1, E), np.float32), np.empty((k, E), np.float32)
    _kquants.moe_decode_into(h, gates, ups, downs, int(tg), int(td), weights, y, out, threads)
    want = per_expert_path(h, gates, ups, downs, tg, td, weights, threads)
    assert np.array_equal(out, want)
    # and it is the MoE block: the float reference (dequantized weights), to the rounding of
    # the Q8_K activations
    ref = np.zeros((1, E), np.float32)
    for t in range(k):
        g = h @ dequantize(QTensor(tg, (FF, E), gates[t])).T
        u = h @ dequantize(QTensor(tg, (FF, E), ups[t])).T
        ref += weights[t] * ((g / (1 + np.exp(-g)) * u) @ dequantize(QTensor(td, (E, FF), downs[t])).T)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()  # int8 activations (twice)


def test_a_non_finite_activation_gives_nan_outputs():
    rng = np.random.default_rng(5)
    gates, ups, downs = expert_weights(T.Q4_K, 2, rng)
    h = rng.standard_normal((1, E)).astype(np.float32)
    h[0, 17] = np.nan
    out, y = np.empty((1, E), np.float32), np.empty((2, E), np.float32)
    _kquants.moe_decode_into(h, gates, ups, downs, int(T.Q4_K), int(T.Q4_K), np.ones(2, np.float32), y, out, 2)
    assert np.isnan(out).all()


def test_bad_arguments_are_named():
    rng = np.random.default_rng(6)
    gates, ups, downs = expert_weights(T.Q4_K, 2, rng)
    h, out, y = np.zeros((1, E), np.float32), np.empty((1, E), np.float32), np.empty((2, E), np.float32)
    with pytest.raises(ValueError, match="2 gates, 1 ups"):
        _kquants.moe_decode_into(h, gates, ups[:1], downs, int(T.Q4_K), int(T.Q4_K), np.ones(2, np.float32), y, out)
    with pytest.raises(ValueError, match=r"down 1 is uint8\[256, 288\], expected \[512, 144\]"):
        _kquants.moe_decode_into(h, gates, ups, [downs[0], gates[0]], int(T.Q4_K), int(T.Q4_K),
                                 np.ones(2, np.float32), y, out)
    with pytest.raises(ValueError, match="not supported"):
        _kquants.moe_decode_into(h, gates, ups, downs, int(T.Q8_0), int(T.Q4_K), np.ones(2, np.float32), y, out)


def stacked_experts(tg, td, n_expert: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_expert experts' gate, up, down as a file stacks them: uint8[n_expert, one expert's bytes]."""
    gates, ups, _ = expert_weights(tg, n_expert, rng)
    downs = expert_weights(td, n_expert, rng)[2]
    return tuple(np.stack([w.reshape(-1) for w in part]) for part in (gates, ups, downs))


def route_then_fused(h, router, stacked, tg, td, k, norm, threads):
    """What Model.route and fused_experts do: the F32 router through _legacy's kernel, softmax,
    top k, the chosen experts in ascending id through moe_decode_into."""
    probs = np.empty((1, router.shape[0]), np.float32)
    _legacy.matmul_into(h, router.view(np.uint8), int(T.F32), probs, threads)
    _ops.softmax_rows_into(probs, probs)
    ids, weights = np.empty((1, k), np.int64), np.empty((1, k), np.float32)
    _ops.topk_weights_into(probs, ids, weights, norm)
    order = np.argsort(ids[0])
    gates, ups, downs = ([part[e].reshape(rows, -1) for e in ids[0][order]]
                         for part, rows in zip(stacked, (FF, FF, E)))
    out, y = np.empty((1, E), np.float32), np.empty((k, E), np.float32)
    _kquants.moe_decode_into(h, gates, ups, downs, int(tg), int(td), weights[0][order].copy(), y, out, threads)
    return probs, ids, weights, out


@pytest.mark.parametrize("tg,td", [(T.Q2_K, T.Q2_K), (T.Q4_K, T.Q6_K)])
@pytest.mark.parametrize("k,norm", [(1, False), (4, True), (8, False)])
@pytest.mark.parametrize("threads", [1, 3])
def test_route_and_experts_in_one_call_give_the_separate_calls_bits(tg, td, k, norm, threads):
    rng = np.random.default_rng(k * 10 + int(td))
    n_expert = 24
    stacked = stacked_experts(tg, td, n_expert, rng)
    router = rng.standard_normal((n_expert, E)).astype(np.float32) * 0.1
    h = rng.standard_normal((1, E)).astype(np.float32)
    probs, ids, weights = np.empty((1, n_expert), np.float32), np.empty((1, k), np.int64), np.empty((1, k), np.float32)
    out, y = np.empty((1, E), np.float32), np.empty((k, E), np.float32)
    _kquants.moe_route_decode_into(h, router, *stacked, int(tg), int(td), norm, probs, ids, weights, y, out, threads)
    want = route_then_fused(h, router, stacked, tg, td, k, norm, threads)
    for got, expected in zip((probs, ids, weights, out), want):
        assert np.array_equal(got, expected)


def test_route_call_bad_arguments_are_named():
    rng = np.random.default_rng(7)
    stacked = stacked_experts(T.Q4_K, T.Q4_K, 6, rng)
    router, h = np.zeros((6, E), np.float32), np.zeros((1, E), np.float32)
    probs, ids, weights = np.empty((1, 6), np.float32), np.empty((1, 2), np.int64), np.empty((1, 2), np.float32)
    out, y = np.empty((1, E), np.float32), np.empty((2, E), np.float32)
    args = (int(T.Q4_K), int(T.Q4_K), True, probs, ids, weights, y, out)
    with pytest.raises(ValueError, match=r"router \[5, 512\]"):
        _kquants.moe_route_decode_into(h, router[:5], *stacked, *args)
    with pytest.raises(ValueError, match=r"stacked experts gate uint8\[6, .*do not hold 6 experts"):
        _kquants.moe_route_decode_into(h, router, np.ascontiguousarray(stacked[0][:, :-1]), *stacked[1:], *args)
    with pytest.raises(ValueError, match=r"stacked experts gate uint8\[5, "):
        _kquants.moe_route_decode_into(h, router, stacked[0][:5], *stacked[1:], *args)
    with pytest.raises(ValueError, match="not supported"):
        _kquants.moe_route_decode_into(h, router, *stacked, int(T.Q8_0), *args[1:])
    with pytest.raises(ValueError, match=r"ids \[1, 7\]"):
        _kquants.moe_route_decode_into(h, router, *stacked, *args[:4], np.empty((1, 7), np.int64),
                                       np.empty((1, 7), np.float32), np.empty((7, E), np.float32), out)


# ---- the model: fused == per-expert path, resident and streamed --------------------------------
SMALL_MOE = Preset("test-moe-fused", "qwen3moe", "Qwen3MoeForCausalLM", n_layer=2, n_embd=E, n_head=4,
                   n_head_kv=2, head_dim=128, n_expert=16, n_expert_used=4, n_ff_exp=FF, n_vocab=49152,
                   n_ff=1024, rope_base=1e6, rms_eps=1e-6, n_ctx=512, norm_topk=True)
PROMPT = [1, 504, 3458, 282, 4649]


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory, demo_model):  # demo_model: synth borrows its tokenizer
    return synth_model(tmp_path_factory.mktemp("fused") / "moe.gguf", SMALL_MOE, progress=False)


def decode_logits(path, steps: int = 6, **load) -> np.ndarray:
    """Logits of a prefill and `steps` single-token decode steps (greedy), stacked."""
    with Engine.load(path, n_ctx=64, threads=2, **load) as eng:
        m = eng.model
        logits = [m.forward(PROMPT, 0)]
        for j in range(steps):
            logits.append(m.forward([int(np.argmax(logits[-1]))], len(PROMPT) + j))
        return np.concatenate(logits)


def test_the_model_takes_the_one_call_paths_and_keeps_the_bits(small_moe, monkeypatch):
    """Resident decode takes moe_route_decode_into (router and experts in one call); without it
    (Model.routed_kernel None: experts from a store, another router type) moe_decode_into; without
    that the per-expert path. The three give the same logits. (This is run_layers' per-layer
    loop: a decode step's layers in one call, tests/test_decode_layers.py, would call neither.)"""
    monkeypatch.setattr(Model, "decode_plan", lambda self: None)
    calls = {"route": 0, "fused": 0}
    route, fused = _kquants.moe_route_decode_into, _kquants.moe_decode_into

    def counting(name, real):
        def call(*a):
            calls[name] += 1
            return real(*a)
        return call
    monkeypatch.setattr(_kquants, "moe_route_decode_into", counting("route", route))
    monkeypatch.setattr(_kquants, "moe_decode_into", counting("fused", fused))
    one_call = decode_logits(small_moe)
    assert calls == {"route": 6 * SMALL_MOE.n_layer, "fused": 0}  # every decode step, every layer
    monkeypatch.setattr(Model, "routed_kernel", lambda self, moe: None)
    fused_experts = decode_logits(small_moe)
    assert calls == {"route": 6 * SMALL_MOE.n_layer, "fused": 6 * SMALL_MOE.n_layer}
    monkeypatch.setattr(KernelCache, "moe_kernel", lambda self, tg, td: None)
    per_expert = decode_logits(small_moe)
    assert np.array_equal(one_call, fused_experts)
    assert np.array_equal(one_call, per_expert)


def test_the_one_call_path_records_the_routing(small_moe, monkeypatch):
    """record_routing sees the same experts whichever path chose them."""
    def routes(**load):
        with Engine.load(small_moe, n_ctx=64, threads=2, record_routing=True, **load) as eng:
            eng.model.forward(PROMPT, 0)
            for j in range(3):
                eng.model.forward([7 + j], len(PROMPT) + j)
            return [[p[i].copy() for i in range(SMALL_MOE.n_layer)] for p in eng.model.routing_trace.passes]
    one_call = routes()
    monkeypatch.setattr(Model, "routed_kernel", lambda self, moe: None)
    per_path = routes()
    assert len(one_call) == len(per_path) == 4
    for a, b in zip(one_call, per_path):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)


def test_prefill_experts_in_two_calls_keep_the_bits(small_moe, monkeypatch):
    """A prompt's experts go through matmul_many_into (gate/up of all, then down of all); without
    it, expert_ffn one by one: the same logits."""
    calls = []
    real = _kquants.matmul_many_into
    monkeypatch.setattr(_kquants, "matmul_many_into", lambda *a: calls.append(1) or real(*a))
    batched = decode_logits(small_moe, steps=0)
    assert len(calls) == 2 * SMALL_MOE.n_layer  # one gate/up and one down call a layer
    monkeypatch.setattr(Model, "many_rows_kernel", lambda self, qtype, n: None)
    one_by_one = decode_logits(small_moe, steps=0)
    assert np.array_equal(batched, one_by_one)


@pytest.mark.parametrize("policy", ["lru", "lfu", "decay", "page-cache"])
@pytest.mark.parametrize("prefetch,mult", [("none", 1), ("lookahead", 3)])
def test_streamed_equals_resident_with_the_fused_call(small_moe, policy, prefetch, mult):
    """Streamed, a layer's experts arrive in batches (those in memory first): the fused call runs
    when one batch holds them all, the per-expert path otherwise; either way the resident bits."""
    resident = decode_logits(small_moe)
    streamed = decode_logits(small_moe, stream="experts", cache_policy=policy, prefetch=prefetch,
                             cache_slots=mult * SMALL_MOE.n_expert_used, io_threads=2)
    assert np.array_equal(resident, streamed)
