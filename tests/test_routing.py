"""Routing sources (engine/observe/routing.py): the calibrated synthetic generator reproduces flash-moe's
per-layer LRU curve and overlap; its choices are deterministic in any request order; a trace
recorded from a model replays to the same expert requests and, replayed on the same model, the
same bits; bad specs and mismatched traces are refused with messages naming what is wrong."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from weightstream.engine.observe.routing import (FLASH_MOE_LRU, FLASH_MOE_OVERLAP, FLASH_MOE_QWEN35, FLASH_MOE_TOKENS, FLASH_MOE_TOP_K,
                            RoutingTrace, RoutingTraceError, SyntheticRouting, consecutive_overlap, layer_choices,
                            lru_curve, parse_routing)

CURVE_TOLERANCE = 0.03  # max abs error of the per-layer LRU hit rate at 16/32/64/128 slots


def moe_cfg(n_layer=2, n_expert=8, top_k=2):
    return SimpleNamespace(n_layer=n_layer, n_expert=n_expert, n_expert_used=top_k, is_moe=n_expert > 0)


# ---- the synthetic generator ------------------------------------------------------------------
def test_calibrated_preset_reproduces_flash_moe_statistics():
    # seed 1: the preset was calibrated on seed 0, so this checks the parameters, not one draw
    source = SyntheticRouting(24, 512, FLASH_MOE_TOP_K, seed=1)
    curve = lru_curve(source, FLASH_MOE_TOKENS, FLASH_MOE_LRU)
    errors = {c: round(curve[c] - target, 3) for c, target in FLASH_MOE_LRU.items()}
    assert max(map(abs, errors.values())) <= CURVE_TOLERANCE, errors
    lo, hi = FLASH_MOE_OVERLAP
    assert lo <= consecutive_overlap(source, FLASH_MOE_TOKENS) <= hi
    # layers independent: two layers share about what two unrelated draws share
    rows = [layer_choices(source, layer, FLASH_MOE_TOKENS) for layer in range(24)]  # [tokens, k] each
    across = np.mean([len(np.intersect1d(a[t], b[t]))
                      for a, b in zip(rows, rows[1:]) for t in range(0, FLASH_MOE_TOKENS, 10)])
    assert across / FLASH_MOE_TOP_K < 0.1


def test_synthetic_choices_are_deterministic_in_any_order_and_distinct():
    def ask(source, order):
        return {(layer, t): source.choose(layer, t) for layer, t in order}

    pairs = [(layer, t) for layer in range(3) for t in range(40)]
    in_order = ask(SyntheticRouting(3, 64, 10, zipf=1.2, reuse=0.4, seed=7), pairs)
    shuffled = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
    out_of_order = ask(SyntheticRouting(3, 64, 10, zipf=1.2, reuse=0.4, seed=7), shuffled)
    other_seed = ask(SyntheticRouting(3, 64, 10, zipf=1.2, reuse=0.4, seed=8), pairs)
    assert all(np.array_equal(in_order[p], out_of_order[p]) for p in pairs)
    assert not all(np.array_equal(in_order[p], other_seed[p]) for p in pairs)
    for ids in in_order.values():
        assert ids.dtype == np.int64 and ids.shape == (10,)
        assert len(set(ids.tolist())) == 10 and 0 <= ids.min() and ids.max() < 64


def test_synthetic_reuse_extremes():
    always = SyntheticRouting(1, 32, 4, reuse=1.0)
    assert all(np.array_equal(always.choose(0, t), always.choose(0, 0)) for t in range(10))
    everything = SyntheticRouting(1, 6, 6, reuse=0.0)  # top_k == n_expert: every expert each token
    assert sorted(everything.choose(0, 3).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="top_k"):
        SyntheticRouting(1, 4, 5)
    with pytest.raises(ValueError, match="reuse"):
        SyntheticRouting(1, 8, 2, reuse=1.5)


# ---- traces -----------------------------------------------------------------------------------
def test_trace_round_trip_and_replay_order(tmp_path):
    trace = RoutingTrace(n_layer=3, n_expert=8, top_k=2)
    prefill = {0: [[1, 2], [3, 4]], 2: [[5, 6], [7, 0]]}  # layer 1 dense: nothing routed
    for layer, ids in prefill.items():
        trace.record(layer, ids)
    trace.record(0, [[2, 1]])  # the next pass (one decode token)
    trace.record(2, [[6, 5]])
    path = tmp_path / "trace.json"
    trace.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # the temporary name is gone
    loaded = RoutingTrace.load(path)
    assert len(loaded.passes) == 2 and loaded.passes[0][1] is None
    assert [loaded.choose(0, t).tolist() for t in range(3)] == [[1, 2], [3, 4], [2, 1]]
    assert loaded.choose(2, 2).tolist() == [6, 5]
    with pytest.raises(RoutingTraceError, match=r"trace\.json: layer 0 has 3 recorded tokens, position 3"):
        loaded.choose(0, 3)
    with pytest.raises(RoutingTraceError, match=r"trace\.json: layer 1 has 0 recorded tokens"):
        loaded.choose(1, 0)


def test_trace_refused_when_it_does_not_fit_the_model(tmp_path):
    path = tmp_path / "wide.json"
    wide = RoutingTrace(n_layer=2, n_expert=16, top_k=2)
    wide.record(0, [[15, 3]])
    wide.save(path)
    with pytest.raises(RoutingTraceError, match=r"wide\.json: recorded with 16 experts per layer, the model has 8"):
        parse_routing(f"trace:{path}", moe_cfg(n_expert=8))
    doc = json.loads(path.read_text())
    doc["n_expert"] = 8  # the header says 8, layer 0 holds expert 15
    path.write_text(json.dumps(doc))
    with pytest.raises(RoutingTraceError, match=r"wide\.json: pass 0, layer 0: expert ids 3\.\.15 outside the 8"):
        RoutingTrace.load(path)
    path.write_text("{not json")
    with pytest.raises(RoutingTraceError, match=r"wide\.json: cannot read it"):
        RoutingTrace.load(path)


# ---- parse_routing ----------------------------------------------------------------------------
def test_parse_routing_forms_and_errors(tmp_path):
    cfg = moe_cfg(n_layer=3, n_expert=16, top_k=4)
    assert parse_routing("model", cfg) is None
    default = parse_routing("synthetic", cfg)
    assert (default.n_layer, default.n_expert, default.top_k) == (3, 16, 4)
    assert (default.zipf, default.reuse, default.seed) == (FLASH_MOE_QWEN35["zipf"], FLASH_MOE_QWEN35["reuse"], 0)
    custom = parse_routing("synthetic:zipf=1.1,seed=2", cfg)
    assert (custom.zipf, custom.reuse, custom.seed) == (1.1, FLASH_MOE_QWEN35["reuse"], 2)
    for spec in ("router", "trace", "trace:", "synth:zipf=1"):
        with pytest.raises(ValueError, match=r"routing must be one of model, trace:FILE, synthetic"):
            parse_routing(spec, cfg)
    for spec in ("synthetic:alpha=1", "synthetic:zipf=high", "synthetic:seed=1.5"):
        with pytest.raises(ValueError, match=r"is not one of zipf=float, reuse=float, seed=int"):
            parse_routing(spec, cfg)
    with pytest.raises(ValueError, match="no routed experts"):
        parse_routing("synthetic", moe_cfg(n_expert=0, top_k=0))
    with pytest.raises(RoutingTraceError, match=r"missing\.json: cannot read it"):
        parse_routing(f"trace:{tmp_path / 'missing.json'}", cfg)


# ---- on a model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.hf_models import moe_gguf_file, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("demo model (tokenizer source) unavailable")
    return moe_gguf_file("qwen3moe", tmp_path_factory.mktemp("qwen3moe"))


PROMPT = np.random.default_rng(0).integers(0, 500, 8).tolist()
STREAMED = dict(n_ctx=64, stream="experts", cache_slots=4, profile=True)


def test_recorded_trace_replays_the_same_expert_requests(moe_gguf, tmp_path):
    from weightstream.engine import Engine

    path = tmp_path / "generate.json"
    with Engine.load(moe_gguf, record_routing=True, **STREAMED) as eng:
        tokens = list(eng.generate_tokens(PROMPT, 8))
        accesses = eng.profiler.access_trace()
        trace = eng.model.routing_trace
        assert len(trace.passes) == 8  # the prompt's pass, then 7 decode passes
        trace.save(path)
    with Engine.load(moe_gguf, routing=f"trace:{path}", **STREAMED) as eng:
        assert list(eng.generate_tokens(PROMPT, 8)) == tokens
        assert eng.profiler.access_trace() == accesses
        with pytest.raises(RoutingTraceError, match=r"generate\.json: layer 0 has 15 recorded tokens, position 15"):
            list(eng.generate_tokens(PROMPT, 9))


def test_replaying_the_models_own_routing_gives_the_same_bits(moe_gguf, tmp_path):
    from weightstream.engine import Engine

    ids = np.random.default_rng(1).integers(0, 500, 20).tolist()
    path = tmp_path / "logits.json"
    with Engine.load(moe_gguf, n_ctx=64) as eng:
        plain = eng.logits(ids)
    with Engine.load(moe_gguf, n_ctx=64, record_routing=True) as eng:
        assert np.array_equal(eng.logits(ids), plain)  # recording changes nothing
        eng.model.routing_trace.save(path)
    with Engine.load(moe_gguf, n_ctx=64, routing=f"trace:{path}") as eng:
        assert np.array_equal(eng.logits(ids), plain)
    synthetic = []
    for _ in range(2):
        with Engine.load(moe_gguf, n_ctx=64, routing="synthetic:seed=3") as eng:
            synthetic.append(eng.logits(ids))
    assert np.all(np.isfinite(synthetic[0])) and np.array_equal(synthetic[0], synthetic[1])
    assert not np.array_equal(synthetic[0], plain)
