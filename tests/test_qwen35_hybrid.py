"""The Qwen3.5 family end to end: random-init transformers models of qwen3_5_moe, qwen3_5 and
qwen3_next (Gated DeltaNet + gated full attention), converted by our converter, run by our engine
and compared with transformers on the same weights.

The configs (tests/hf_models.py HYBRID_CASES) exercise the conventions a reader must follow: K heads
(2) != V heads (4) (llama.cpp's V-head reorder for qwen35*, Hugging Face's grouped order for
qwen3next), norms stored with +1 and perturbed, A_log and dt_bias perturbed (stored as -exp(A_log)
and ssm_dt.bias), full-attention layers in three layouts (last of four, every second, first and
last; partial rotary on the first quarter of the head, an output gate packed in attn_q), a shared
expert with its sigmoid gate.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import hf_models  # noqa: E402
from tests.hf_models import GGUF_ARCH, HYBRID_CASES  # noqa: E402
from tests.tiny_gguf import rewritten_gguf  # noqa: E402
from weightstream.engine.errors import ConfigError  # noqa: E402
from weightstream.engine.model.config import LINEAR_ATTENTION  # noqa: E402
from weightstream.engine.runtime.engine import Engine  # noqa: E402
from weightstream.engine.tools.convert import convert_hf_to_gguf  # noqa: E402

N_TOKENS = 64


def perturb_linear_attention(model, seed: int) -> None:
    """A_log and dt_bias away from hf_models' generic draw: decays that differ per head (A_log in
    [-1, 1.5]) and offsets that matter (dt_bias N(0, 0.5)), so that -exp(A_log) and the V-head
    order are exercised."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2.5 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


_built: dict[str, tuple] = {}


def hybrid_model(case: str, tmp_path_factory, out_type: str = "f32"):
    """(transformers model, GGUF path) for a case, built and converted once per session."""
    key = f"{case}-{out_type}"
    if key not in _built:
        import transformers

        model_cls = HYBRID_CASES[case][1]
        root = tmp_path_factory.mktemp(f"hybrid-{case}")
        torch.manual_seed(0)
        model, hf_dir = hf_models.make_hf_model(case, root / "hf", seed=3)
        perturb_linear_attention(model, 3)
        model.save_pretrained(hf_dir, safe_serialization=True)
        assert isinstance(model, getattr(transformers, model_cls))
        _built[key] = (model, convert_hf_to_gguf(hf_dir, root / f"model-{out_type}.gguf", out_type))
    return _built[key]


@pytest.fixture(scope="module", params=list(HYBRID_CASES))
def case(request):
    return request.param


def prompt_ids(n_vocab: int, n: int = N_TOKENS, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).tolist()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference over the reference logits' scale (their largest magnitude)."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_config_reads_the_hybrid_layout(case, tmp_path_factory):
    model, path = hybrid_model(case, tmp_path_factory)
    with Engine.load(path) as eng:
        cfg = eng.config
        assert cfg.arch == GGUF_ARCH[case]
        hf_types = model.config.layer_types
        assert cfg.layer_types == tuple(LINEAR_ATTENTION if t == "linear_attention" else "attention" for t in hf_types)
        assert "attention" in cfg.layer_types and LINEAR_ATTENTION in cfg.layer_types
        d = cfg.linear
        assert (d.n_k_heads, d.n_v_heads, d.k_head_dim, d.v_head_dim, d.conv_kernel) == (2, 4, 16, 16, 4)
        assert cfg.n_rot == 8  # a quarter of the 32-wide heads rotate


def test_logits_and_greedy_tokens_match_transformers(case, tmp_path_factory):
    model, path = hybrid_model(case, tmp_path_factory)
    ids = prompt_ids(model.config.vocab_size)
    ref = hf_logits(model, ids)
    with Engine.load(path, n_ctx=128) as eng:
        ours = eng.logits(ids)
        assert rel_err(ours, ref) < 1e-3
        # greedy continuation, 32 tokens, each step from the cached state (decode path)
        m = eng.model
        logits = m.forward(ids, 0)
        tokens = []
        for step in range(32):
            tokens.append(int(np.argmax(logits[-1])))
            logits = m.forward([tokens[-1]], len(ids) + step)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)
    assert tokens == out[0, len(ids):].tolist()


def test_one_prefill_call_equals_token_by_token_and_split_calls(case, tmp_path_factory):
    """The prompt in one call, in two calls (state and KV cache carried) and one token at a time
    give the same logits."""
    model, path = hybrid_model(case, tmp_path_factory)
    ids = prompt_ids(model.config.vocab_size, seed=11)
    with Engine.load(path, n_ctx=128) as eng:
        m = eng.model
        whole = m.forward(ids, 0, all_logits=True)
        first = m.forward(ids[:40], 0, all_logits=True)
        rest = m.forward(ids[40:], 40, all_logits=True)
        one_by_one = np.concatenate([m.forward([t], p) for p, t in enumerate(ids)])
    scale = np.max(np.abs(whole))
    assert np.max(np.abs(np.concatenate([first, rest]) - whole)) / scale < 1e-5
    assert np.max(np.abs(one_by_one - whole)) / scale < 1e-4  # float32 sums in another order


def test_a_new_sequence_resets_the_recurrent_state_and_rewinding_is_refused(case, tmp_path_factory):
    model, path = hybrid_model(case, tmp_path_factory)
    ids = prompt_ids(model.config.vocab_size, n=16)
    with Engine.load(path, n_ctx=64) as eng:
        m = eng.model
        a = m.forward(ids, 0)
        m.forward(ids[:5], 16)  # continues the sequence
        b = m.forward(ids, 0)  # starts again: the state is zeroed
        np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="recurrent"):
            m.forward(ids[:2], 3)


@pytest.mark.parametrize("policy,prefetch", [("lru", "routing"), ("lfu", "none"), ("decay", "lookahead"),
                                             ("page-cache", "routing")])
def test_streamed_equals_resident_bit_for_bit(tmp_path_factory, policy, prefetch):
    """Every cache policy and prefetch mode, with the profiler on: a prefill then decode steps."""
    _, path = hybrid_model("qwen35moe", tmp_path_factory, "q8_0")
    ids = prompt_ids(1000, n=20, seed=5)
    with Engine.load(path, n_ctx=64) as eng:
        resident = [eng.model.forward(ids, 0)] + [eng.model.forward([t], 20 + j) for j, t in enumerate(ids[:6])]
    with Engine.load(path, n_ctx=64, stream="experts", cache_slots=6, cache_policy=policy, prefetch=prefetch,
                     profile=True) as eng:
        streamed = [eng.model.forward(ids, 0)] + [eng.model.forward([t], 20 + j) for j, t in enumerate(ids[:6])]
        x = eng.stats()["experts"]
    assert x["misses"] > 0 and x["bytes_read"] > 0
    for r, s in zip(resident, streamed):
        np.testing.assert_array_equal(r, s)


def test_imatrix_and_quantize_cover_the_linear_attention_tensors(tmp_path_factory, tmp_path):
    """imatrix collects every matrix of the hybrid (the linear-attention projections included);
    a q4_k_m requantization with it keeps llama.cpp's F32 tensors (norms, ssm_conv1d, ssm_a,
    ssm_dt, routers), quantizes the rest, and runs. (Its logits are not compared: these tiny
    random hybrids magnify rounding, see the Q8_0 test; the quantized math is checked there.)"""
    import gguf
    from weightstream.engine.tools.imatrix import attach, Collector
    from weightstream.engine.tools.quantize import quantize_gguf

    _, path = hybrid_model("qwen35moe", tmp_path_factory)
    ids = prompt_ids(1000, n=48, seed=9)
    with Engine.load(path, n_ctx=64) as eng:
        collector = Collector()
        attach(eng.model, collector)
        eng.model.forward(ids, 0)
        values, _ = collector.result(48)
        exact = eng.logits(ids)
    for name in ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_beta.weight",
                 "blk.0.ssm_alpha.weight", "blk.0.ssm_out.weight", "blk.3.attn_q.weight", "blk.3.attn_output.weight",
                 "blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_shexp.weight"):
        assert name in values and np.all(np.isfinite(values[name])) and values[name].max() > 0, name
    out = quantize_gguf(path, tmp_path / "q4.gguf", "q4_k_m", imatrix=values, progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    F32 = gguf.GGMLQuantizationType.F32
    for name, qtype in types.items():
        keep = name.endswith(("_norm.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ffn_gate_inp.weight",
                              "ffn_gate_inp_shexp.weight"))
        assert (qtype == F32) == keep, (name, qtype.name)
    with Engine.load(out, n_ctx=64) as eng:
        q4 = eng.logits(ids)
    assert np.isfinite(q4).all() and q4.shape == exact.shape


def q8_0_round_trip(model, case: str):
    """A copy of model holding what the Q8_0 file holds: 1-D tensors, routers and the conv stay
    F32; other matrices go through Q8_0 and back (F16 where rows are not whole blocks), each in
    the file's column order: qwen35's out_proj columns are quantized after the V-head reorder."""
    import copy

    import gguf

    cfg = model.config
    hk, hv, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    # file value head j holds Hugging Face's head (j % hk) * (hv / hk) + j // hk (tiled order)
    heads = [(j % hk) * (hv // hk) + j // hk for j in range(hv)]
    tiled_cols = np.concatenate([np.arange(h * dv, (h + 1) * dv) for h in heads])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.ndim == 1 or "conv1d" in name or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                continue
            arr = p.detach().numpy()
            cols = tiled_cols if name.endswith("linear_attn.out_proj.weight") and case != "qwen3next" else None
            if cols is not None:
                arr = arr[:, cols]
            qt = gguf.GGMLQuantizationType.Q8_0 if arr.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16
            back = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt).reshape(arr.shape)
            if cols is not None:
                back = back[:, np.argsort(cols)]
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return twin


def test_q8_0_file_matches_transformers_on_the_same_values(case, tmp_path_factory, tmp_path):
    """The Q8_0 file with float activations (backend numpy) against transformers holding the
    file's values; the fused kernels (int8 activations, as llama.cpp) close to that. The gated
    RMSNorm rescales each value head's output to unit size, so at the few positions where a head's
    delta-rule output is near zero (random weights) int8 rounding of the activations is magnified:
    the check is on the median position, with the MoE's routes replayed from the float run so
    that near-tie routing flips do not count (measured: 0.3-3% NMSE, spikes to ~50% at such
    positions; the Cython and Numba kernels agree with each other; a wrong buffer or stride gives
    O(1) everywhere)."""
    model, _ = hybrid_model(case, tmp_path_factory)
    _, path = hybrid_model(case, tmp_path_factory, "q8_0")
    ids = prompt_ids(model.config.vocab_size)
    ref = hf_logits(q8_0_round_trip(model, case), ids)
    moe = case != "qwen35"
    with Engine.load(path, backend="numpy", record_routing=moe) as eng:
        exact = eng.logits(ids)
        if moe:
            eng.model.routing_trace.save(tmp_path / "routes.npz")
    assert rel_err(exact, ref) < 1e-3
    with Engine.load(path, routing=f"trace:{tmp_path / 'routes.npz'}" if moe else "model") as eng:
        fused = eng.logits(ids)
    per_position = np.mean((fused - exact) ** 2, axis=1) / np.mean(exact ** 2)
    assert np.median(per_position) < 5e-2


@pytest.mark.parametrize("k", [1, 3])
def test_experts_per_token_routes_to_the_top_k_renormalised(tmp_path_factory, k):
    """experts_per_token=K runs the model as transformers does with num_experts_per_tok=K."""
    for case in ("qwen35moe", "qwen3next"):
        model, path = hybrid_model(case, tmp_path_factory)
        ids = prompt_ids(model.config.vocab_size, n=24)
        routers = [layer.mlp.gate for layer in model.model.layers]
        default_k = routers[0].top_k
        for r in routers:
            r.top_k = k
        try:
            ref = hf_logits(model, ids)
        finally:
            for r in routers:
                r.top_k = default_k
        with Engine.load(path, experts_per_token=k) as eng:
            assert eng.config.n_expert_used == k
            ours = eng.logits(ids)
        assert rel_err(ours, ref) < 1e-3
        assert rel_err(ours, hf_logits(model, ids)) > 1e-3  # K matters


@pytest.mark.parametrize("k", [0, 9, -1])
def test_experts_per_token_out_of_range_is_refused(tmp_path_factory, k):
    _, path = hybrid_model("qwen35moe", tmp_path_factory)
    with pytest.raises((ConfigError, ValueError), match="experts_per_token"):
        Engine.load(path, experts_per_token=k)


def test_budget_counts_the_recurrent_state(tmp_path_factory):
    """The memory plan's state bytes are the recurrent states of the linear layers plus the KV
    cache of the attention layer, as the Model allocates them."""
    _, path = hybrid_model("qwen35moe", tmp_path_factory, "q8_0")
    with Engine.load(path, memory_budget="200MiB", n_ctx=64) as eng:
        held = sum(s.nbytes for s in eng.model.states.values())
        d = eng.config.linear
        recurrent = 3 * 4 * ((d.conv_kernel - 1) * d.conv_dim + d.n_v_heads * d.k_head_dim * d.v_head_dim)
        kv = 2 * 4 * 64 * eng.config.n_head_kv * eng.config.head_dim
        assert held == recurrent + kv
        assert eng.plan.kv_cache == held  # the plan's per-layer state bytes


def test_legacy_qwen3next_ssm_in_and_ssm_ba_give_the_same_model(tmp_path_factory, tmp_path):
    """Older qwen3next files hold ssm_in ([q, k, v, z] per key head) and ssm_ba ([b, a] per key
    head) where current ones hold attn_qkv + attn_gate and ssm_beta + ssm_alpha: rebuilt that way,
    the file gives the same logits bit for bit."""
    model, path = hybrid_model("qwen3next", tmp_path_factory)
    c = model.config
    hk, dk, dv = c.linear_num_key_heads, c.linear_key_head_dim, c.linear_value_head_dim
    r = c.linear_num_value_heads // hk

    def to_legacy(t):
        out = {}
        for name, arr in t.items():
            p = name.rsplit("attn_qkv.weight", 1)[0]
            if name.endswith("attn_qkv.weight"):
                qkv, z = arr, t[p + "attn_gate.weight"]
                kd = hk * dk
                groups = [np.concatenate([qkv[g * dk:(g + 1) * dk], qkv[kd + g * dk:kd + (g + 1) * dk],
                                          qkv[2 * kd + g * r * dv:2 * kd + (g + 1) * r * dv], z[g * r * dv:(g + 1) * r * dv]])
                          for g in range(hk)]
                out[p + "ssm_in.weight"] = np.concatenate(groups)
            elif name.endswith("ssm_beta.weight"):
                q = name.rsplit("ssm_beta.weight", 1)[0]
                b, a = arr, t[q + "ssm_alpha.weight"]
                out[q + "ssm_ba.weight"] = np.concatenate([np.concatenate([b[g * r:(g + 1) * r], a[g * r:(g + 1) * r]])
                                                           for g in range(hk)])
            elif not name.endswith(("attn_gate.weight", "ssm_alpha.weight")):
                out[name] = arr
        return out

    legacy = rewritten_gguf(path, tmp_path / "legacy.gguf", to_legacy)
    ids = prompt_ids(model.config.vocab_size, n=24)
    with Engine.load(path) as a, Engine.load(legacy) as b:
        assert "blk.1.ssm_in.weight" in b.file and "blk.1.attn_qkv.weight" not in b.file
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))


def test_an_mtp_block_counted_in_block_count_is_skipped(tmp_path_factory, tmp_path):
    """nextn_predict_layers=1 with one more block (an MTP block, here a copy of the last layer)
    runs the same trunk: same logits."""
    import gguf

    model, path = hybrid_model("qwen35moe", tmp_path_factory)
    n = model.config.num_hidden_layers
    last = f"blk.{n - 1}."
    with_mtp = rewritten_gguf(path, tmp_path / "mtp.gguf",
                         lambda t: {**t, **{f"blk.{n}." + k[len(last):]: v for k, v in t.items() if k.startswith(last)}},
                         {"qwen35moe.block_count": n + 1,
                          "qwen35moe.attention.recurrent_layers":
                              [t == "linear_attention" for t in model.config.layer_types] + [False],
                          "qwen35moe.nextn_predict_layers": (1, gguf.GGUFValueType.UINT32, None)})
    ids = prompt_ids(model.config.vocab_size, n=16)
    with Engine.load(path) as a, Engine.load(with_mtp) as b:
        assert b.config.n_layer == n
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))


def test_cli_runs_a_hybrid_with_experts_per_token(tmp_path_factory):
    """`weightstream info` names the layer mix; `run --experts-per-token` takes K, and refuses K
    above the expert count with a clear message, no traceback."""
    from tests.test_cli import cli

    _, path = hybrid_model("qwen35moe", tmp_path_factory, "q8_0")
    rc, out, err = cli("info", path)
    assert rc == 0, err
    assert "qwen35moe" in out and "3 Gated DeltaNet layers" in out
    rc, out, err = cli("run", path, "-p", "Hello", "-n", "4", "--experts-per-token", "1")
    assert rc == 0, err
    assert "tok/s decode" in err
    rc, out, err = cli("run", path, "-p", "Hello", "-n", "4", "--experts-per-token", "99")
    assert rc != 0 and "experts_per_token" in err and "Traceback" not in err
