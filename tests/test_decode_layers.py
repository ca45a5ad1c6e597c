"""A decode step's layers in one native call (kernels/_decode_layers.pxi decode_layers_into;
engine/model/decode_plan.py): the same kernels as the per-layer path of Model.run_layers, in the
same order on the same values, so the tests ask for the same bits: the logits of several decode
steps with the one call and without it (Model.fused_layers), for the attention variants it runs
(per-head and whole-projection Q/K norms, none; NEOX and adjacent-pair RoPE), several weight
types (synth's Q2_K / Q4_K / Q6_K) and thread counts; the QKV parts in turn as concatenated; the paths that need the
per-layer loop keep it; a non-finite layer is named alike; bad tables are named."""
from __future__ import annotations

import numpy as np
import pytest

from weightstream.engine import Engine
from weightstream.engine.errors import NonFiniteError
from weightstream.engine.model.decode_plan import DecodePlan
from weightstream.engine.tools.synth import Preset, synth_model
from weightstream.kernels import _kquants

E, FF = 512, 256
SMALL = {
    # qwen3moe: per-head Q/K norms, NEOX RoPE, top-k weights renormalised
    "qwen3moe": Preset("t-dl-qwen3moe", "qwen3moe", "Qwen3MoeForCausalLM", n_layer=3, n_embd=E, n_head=4,
                       n_head_kv=2, head_dim=128, n_expert=16, n_expert_used=4, n_ff_exp=FF, n_vocab=49152,
                       n_ff=1024, rope_base=1e6, rms_eps=1e-6, n_ctx=512, norm_topk=True),
    # olmoe: Q/K norms over the whole projection, no renormalisation
    "olmoe": Preset("t-dl-olmoe", "olmoe", "OlmoeForCausalLM", n_layer=2, n_embd=E, n_head=4, n_head_kv=4,
                    head_dim=128, n_expert=8, n_expert_used=3, n_ff_exp=FF, n_vocab=49152, n_ff=1024,
                    rope_base=10000.0, rms_eps=1e-5, n_ctx=512, norm_topk=False),
    # mixtral (llama.cpp's llama): no Q/K norm, adjacent-pair RoPE
    "mixtral": Preset("t-dl-mixtral", "llama", "MixtralForCausalLM", n_layer=2, n_embd=E, n_head=4, n_head_kv=2,
                      head_dim=128, n_expert=8, n_expert_used=2, n_ff_exp=FF, n_vocab=49152, n_ff=1024,
                      rope_base=1e6, rms_eps=1e-5, n_ctx=512, norm_topk=True),
}
PROMPT = [1, 504, 3458, 282, 4649]


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model):  # demo_model: synth borrows its tokenizer
    made = {}

    def get(name: str, attn: str = "q4_k", experts: str = "q2_k"):
        key = (name, attn, experts)
        if key not in made:
            out = tmp_path_factory.mktemp("dl") / f"{name}-{attn}-{experts}.gguf"
            made[key] = synth_model(out, SMALL[name], attn_type=attn, experts_type=experts, progress=False)
        return made[key]
    return get


def decode_logits(path, fused: bool, threads: int = 2, steps: int = 5, setup=None) -> np.ndarray:
    """Logits of a prefill and `steps` greedy decode steps, stacked, with Model.fused_layers set
    (setup(model): called after the prefill)."""
    with Engine.load(path, n_ctx=64, threads=threads) as eng:
        m = eng.model
        m.fused_layers = fused
        logits = [m.forward(PROMPT, 0)]
        if setup is not None:
            setup(m)
        for j in range(steps):
            logits.append(m.forward([int(np.argmax(logits[-1]))], len(PROMPT) + j))
        return np.concatenate(logits)


def counting(monkeypatch):
    calls = []
    real = _kquants.decode_layers_into
    monkeypatch.setattr(_kquants, "decode_layers_into", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("name,attn,experts", [
    ("qwen3moe", "q4_k", "q2_k"), ("qwen3moe", "q6_k", "q4_k"), ("qwen3moe", "q2_k", "q6_k"),
    ("olmoe", "q4_k", "q2_k"), ("olmoe", "q6_k", "q6_k"), ("mixtral", "q4_k", "q2_k"), ("mixtral", "q2_k", "q4_k")])
@pytest.mark.parametrize("threads", [1, 3])
def test_one_call_gives_the_per_layer_bits(models, monkeypatch, name, attn, experts, threads):
    path = models(name, attn, experts)
    calls = counting(monkeypatch)
    one_call = decode_logits(path, True, threads)
    assert len(calls) == 5  # every decode step (a prompt keeps the per-layer path)
    per_layer = decode_logits(path, False, threads)
    assert len(calls) == 5
    assert np.array_equal(one_call, per_layer)


def test_qkv_parts_in_turn_give_the_concatenated_bits(models):
    """A mixed-type QKV group (llama.cpp's Q4_K_M keeps attn_v in Q6_K) is up to three parts,
    multiplied in turn into one QKV row: the same rows as one concatenated part."""
    cfg_heads = SMALL["qwen3moe"]
    with Engine.load(models("qwen3moe"), n_ctx=64, threads=2) as eng:
        m = eng.model
        m.forward(PROMPT, 0)
        plan = DecodePlan.build(m)
        assert plan is not None and (plan.ints[:, 0] == 1).all()  # concatenated by the loader
        x0 = np.random.default_rng(3).standard_normal((1, E)).astype(np.float32)
        pos = len(PROMPT)
        cache = [(m.states[i].k.copy(), m.states[i].v.copy()) for i in m.layer_range]
        x1 = x0.copy()
        assert plan.run(x1, pos) == -1
        for i, (k, v) in zip(m.layer_range, cache):  # the same step again from the same caches
            m.states[i].k[:], m.states[i].v[:] = k, v
        # split each layer's QKV rows into Q, K and V parts: addresses inside the same matrix
        pcol = {n: j for j, n in enumerate(_kquants.DECODE_PTRS)}
        icol = {n: j for j, n in enumerate(_kquants.DECODE_INTS)}
        q_rows = cfg_heads.n_head * cfg_heads.head_dim
        kv_rows = cfg_heads.n_head_kv * cfg_heads.head_dim
        for r, i in enumerate(m.layer_range):
            data = m.w.layers[i].wqkv.parts[0].qt.data  # uint8[rows, row bytes]
            qt = plan.ints[r, icol["qkv_type0"]]
            for j, (a, b) in enumerate([(0, q_rows), (q_rows, q_rows + kv_rows),
                                        (q_rows + kv_rows, q_rows + 2 * kv_rows)]):
                plan.ptrs[r, pcol[f"qkv{j}"]] = data[a:].ctypes.data
                plan.ints[r, icol[f"qkv_type{j}"]] = qt
                plan.ints[r, icol[f"qkv_rows{j}"]] = b - a
            plan.ints[r, icol["parts"]] = 3
        x3 = x0.copy()
        assert plan.run(x3, pos) == -1
        assert np.array_equal(x1, x3)


def test_paths_that_need_the_layers_keep_the_per_layer_loop(models, monkeypatch):
    """A routing trace (and likewise a profiler, observer, routing source, prefetcher or expert
    store) needs run_layers' loop: the one call is not made, and the logits are the same."""
    path = models("qwen3moe")
    calls = counting(monkeypatch)
    with Engine.load(path, n_ctx=64, threads=2, record_routing=True) as eng:
        m = eng.model
        m.forward(PROMPT, 0)
        m.forward([7], len(PROMPT))
        assert m.decode_plan() is None and calls == []
    assert np.array_equal(decode_logits(path, True), decode_logits(path, False))


def test_a_non_finite_layer_is_named_alike(models):
    """A layer whose output goes NaN: both paths raise NonFiniteError naming it."""
    def poison(m):
        L = m.w.layers[1]
        L.ffn_norm = np.full_like(L.ffn_norm, np.nan)

    errors = []
    for fused in (True, False):
        with pytest.raises(NonFiniteError) as info:
            decode_logits(models("qwen3moe"), fused, steps=1, setup=poison)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "layer 1" in errors[0]


def test_bad_tables_are_named(models):
    with Engine.load(models("qwen3moe"), n_ctx=64, threads=2) as eng:
        m = eng.model
        m.forward(PROMPT, 0)
        plan = DecodePlan.build(m)
        cfg = m.cfg
        x = np.zeros((1, E), np.float32)

        def call(ptrs=plan.ptrs, ints=plan.ints, pos=len(PROMPT), xx=x):
            return _kquants.decode_layers_into(
                xx, ptrs, ints, cfg.n_head, cfg.n_head_kv, cfg.head_dim, False, False, cfg.rms_eps, pos,
                m.rope.cos, m.rope.sin, cfg.n_rot, True, 0.1, m.n_ctx, cfg.n_expert_used, True, m.attn_scores, 2)
        with pytest.raises(ValueError, match=r"tables \[3, 13\]"):
            call(ptrs=np.ascontiguousarray(plan.ptrs[:, :-1]))
        with pytest.raises(ValueError, match=r"position 64 \(n_ctx 64\)"):
            call(pos=64)
        with pytest.raises(ValueError, match=r"x \[1, 500\]"):
            call(xx=np.zeros((1, 500), np.float32))
        icol = {n: j for j, n in enumerate(_kquants.DECODE_INTS)}
        bad = plan.ints.copy()
        bad[1, icol["qkv_rows0"]] -= 1
        with pytest.raises(ValueError, match=r"layer row 1: QKV parts of \d+ rows"):
            call(ints=bad)
        bad = plan.ints.copy()
        bad[2, icol["wo_type"]] = 8  # Q8_0: not a k-quant
        with pytest.raises(ValueError, match=r"layer row 2: output / expert types 8"):
            call(ints=bad)
        bad = plan.ptrs.copy()
        bad[0, list(_kquants.DECODE_PTRS).index("router")] = 0
        with pytest.raises(ValueError, match="layer row 0: no address for router"):
            call(ptrs=bad)
