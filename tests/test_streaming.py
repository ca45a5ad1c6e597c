"""Streaming end to end: Engine.load(stream=..., memory_budget=..., cache_policy=..., prefetch=...,
io=...) gives the same bits as the resident engine for every setting; the budget sizes the cache
and refuses what cannot fit; a failing read surfaces as a clear error and leaves the engine usable;
the profiler's figures agree with the store's counters."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine import Engine  # noqa: E402
from weightstream.engine.model.workspace import work_buffers  # noqa: E402
from weightstream.engine.stream import reader as expert_io  # noqa: E402
from weightstream.engine.stream.budget import BudgetError, parse_size  # noqa: E402
from weightstream.engine.stream.reader import ExpertReadError  # noqa: E402
from tests.hf_models import moe_gguf_file, smollm2_gguf_path  # noqa: E402

if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)

N_BATCH = 16  # the same prompt batch on both sides: the kernels round per batch


@pytest.fixture(scope="module", params=["qwen3moe", "mixtral"])
def moe_gguf(request, tmp_path_factory):
    return moe_gguf_file(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reference(moe_gguf):
    """Logits of a 24-token sequence and 12 greedy tokens, resident."""
    ids = np.random.default_rng(0).integers(0, 500, 24).tolist()
    with Engine.load(moe_gguf, n_ctx=64, n_batch=N_BATCH) as eng:
        return ids, eng.logits(ids), list(eng.generate_tokens(ids[:8], 12)), eng.config


SETTINGS = [  # (policy, prefetch, io, slots as a multiple of top-k)
    (policy, prefetch, io, mult)
    for policy in ("lru", "lfu", "decay", "page-cache")
    for prefetch, io, mult in (("none", "buffered", 1), ("routing", "direct", 1), ("lookahead", "auto", 3),
                               ("lookahead", "buffered", 1))
    if not (policy == "page-cache" and io == "direct")
]


@pytest.mark.parametrize("policy,prefetch,io,mult", SETTINGS)
def test_streamed_equals_resident_bit_for_bit(moe_gguf, reference, policy, prefetch, io, mult):
    ids, logits, tokens, cfg = reference
    with Engine.load(moe_gguf, n_ctx=64, n_batch=N_BATCH, stream="experts", cache_policy=policy, prefetch=prefetch,
                     io=io, cache_slots=mult * cfg.n_expert_used, io_threads=2) as eng:
        assert np.array_equal(eng.logits(ids), logits)
        assert list(eng.generate_tokens(ids[:8], 12)) == tokens
        x = eng.stats()["experts"]
        assert x["misses"] > 0 and x["bytes_read"] > 0
        p = x["prefetch"]
        assert p["used"] + p["wasted"] + p["cancelled"] <= p["issued"]
        if prefetch == "lookahead" and mult > 1:
            assert p["issued"] > 0


def test_memory_budget_sizes_the_cache(moe_gguf, reference):
    ids, logits, tokens, cfg = reference
    with Engine.load(moe_gguf, n_batch=N_BATCH, stream="experts") as eng:  # no budget: one layer's experts
        assert eng.store.n_slots == cfg.n_expert
        plan = eng.plan
    need = plan.host + plan.resident + plan.kv_cache + plan.work
    budget = need + 3 * plan.slot_bytes + plan.slot_bytes // 2
    with Engine.load(moe_gguf, n_ctx=plan.n_ctx, n_batch=N_BATCH, stream="experts", memory_budget=budget) as eng:
        assert eng.store.n_slots == 3 and eng.plan.total <= budget
        assert eng.stats()["memory"]["budget"] == budget
        assert list(eng.generate_tokens(ids[:8], 12)) == tokens
    too_small = need + plan.slot_bytes  # one slot short of a layer's top-k (2)
    with pytest.raises(BudgetError, match=r"memory budget .* is too small: the metadata and tokenizer, resident weights, KV cache and work "
                                          r"buffers and one layer's 2 expert slot\(s\) need"):
        Engine.load(moe_gguf, n_ctx=plan.n_ctx, n_batch=N_BATCH, stream="experts", memory_budget=too_small)


def test_a_budget_alone_streams_as_the_command_line_does(moe_gguf, reference):
    """Engine.load(path, memory_budget=B) means what `--memory-budget B` means: the experts of a
    MoE stream (stream="auto"), rather than a refusal because the whole model does not fit."""
    ids, logits, tokens, cfg = reference
    with Engine.load(moe_gguf, n_batch=N_BATCH, stream="experts") as eng:
        plan = eng.plan
    budget = plan.host + plan.resident + plan.kv_cache + plan.work + 3 * plan.slot_bytes
    with Engine.load(moe_gguf, n_ctx=plan.n_ctx, n_batch=N_BATCH, memory_budget=budget) as eng:
        assert eng.store is not None and eng.store.n_slots == 3
        assert np.array_equal(eng.logits(ids), logits)
    with pytest.raises(BudgetError, match="too small"):  # asked for explicitly: every expert resident
        Engine.load(moe_gguf, n_ctx=plan.n_ctx, n_batch=N_BATCH, memory_budget=budget, stream="none")


def test_budget_counts_what_the_model_allocates(moe_gguf):
    """The plan's kv_cache is the layers' states, and its work covers the Model's Workspace: the
    same functions size both (engine/model/state.py, engine/model/workspace.py)."""
    with Engine.load(moe_gguf, n_batch=N_BATCH, stream="experts") as eng:
        plan, model = eng.plan, eng.model
        assert sorted(model.states) == list(range(eng.config.n_layer))
        assert plan.kv_cache == sum(state.nbytes for state in model.states.values())
        buffers = work_buffers(eng.config, plan.prefill_batch, plan.n_ctx)
        assert model.work.nbytes == sum(b.nbytes for b in buffers if b.held)
        assert plan.work == sum(b.nbytes for b in buffers) > model.work.nbytes


def test_parse_size():
    assert parse_size("3GiB") == 3 * 2**30 == parse_size("3G") == parse_size(" 3 gib ")
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("512MiB") == 2**29 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="memory size '3 parsecs' not understood"):
        parse_size("3 parsecs")


def _failing_preadv(fail_on: int, result):
    """os.preadv that behaves normally except on call number fail_on, where it raises or returns `result`."""
    real, calls = expert_io.os.preadv, [0]

    def preadv(fd, buffers, offset):
        calls[0] += 1
        if calls[0] == fail_on:
            if isinstance(result, BaseException):
                raise result
            return result
        return real(fd, buffers, offset)
    return preadv


@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), 0])
def test_read_error_surfaces_and_engine_stays_usable(moe_gguf, reference, monkeypatch, failure):
    ids, logits, tokens, cfg = reference
    with Engine.load(moe_gguf, n_ctx=64, n_batch=N_BATCH, stream="experts", cache_slots=cfg.n_expert_used,
                     io="buffered", prefetch="lookahead") as eng:
        monkeypatch.setattr(expert_io.os, "preadv", _failing_preadv(5, failure))
        match = "Input/output error" if failure else "short read"
        with pytest.raises(ExpertReadError, match=rf"model.gguf: .*{match}|model.gguf: {match} of blk\.\d+\.ffn_\w+_exps"):
            eng.logits(ids)
        monkeypatch.undo()
        assert np.array_equal(eng.logits(ids), logits)  # the failed expert was not kept: read again
        assert list(eng.generate_tokens(ids[:8], 12)) == tokens


def test_profiler_agrees_with_the_store(moe_gguf, reference):
    ids, logits, tokens, cfg = reference
    with Engine.load(moe_gguf, n_ctx=64, n_batch=N_BATCH, stream="experts", cache_slots=2 * cfg.n_expert_used,
                     prefetch="routing", profile=True) as eng:
        list(eng.generate_tokens(ids[:8], 12))
        s, x = eng.profile_summary(disk_gbps=1.0), eng.stats()["experts"]
    assert s["hits"] + s["late"] == x["hits"] + x["late"] and s["misses"] == x["misses"]
    assert s["read_bytes"] == x["bytes_read"] and s["decode_passes"] == 11
    assert 0 < s["belady_hit_rate"] <= 1 and s["reuse_rate"] <= s["belady_hit_rate"] + 1e-12
    assert {"capacity", "belady", "lru", "lfu", "decay"} <= set(s["sweep"][0])
    json.dumps(s)  # plain data


def test_stream_ffn_runs_a_dense_model_under_a_budget():
    """SmolLM2 (dense, 98 MB): its FFNs stream, 92 MiB budget (metadata and tokenizer counted), tokens
    and logits as resident."""
    path = smollm2_gguf_path()
    ids = list(range(200, 232))
    with Engine.load(path, n_ctx=256, n_batch=N_BATCH) as eng:
        logits, tokens = eng.logits(ids), list(eng.generate_tokens(ids[:8], 8))
    with Engine.load(path, n_ctx=256, n_batch=N_BATCH, stream="ffn", memory_budget="92MiB",
                     prefetch="lookahead") as eng:
        assert eng.plan.streamed > 40 * 2**20 and eng.plan.total <= 92 * 2**20
        assert np.array_equal(eng.logits(ids), logits)
        assert list(eng.generate_tokens(ids[:8], 8)) == tokens
    with pytest.raises(ValueError, match="nothing to stream"):
        Engine.load(path, stream="experts")


def test_profile_cli_writes_trace_plots_and_json(moe_gguf, tmp_path, capsys):
    from weightstream.engine.cli.main import main

    rc = main(["profile", str(moe_gguf), "-p", "Hello there", "-n", "6", "-c", "64", "--cache-slots", "4",
               "--stream", "experts", "--prefetch", "lookahead", "--disk-gbps", "1.5",
               "--trace", str(tmp_path / "t.json"), "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "s.json")])
    assert rc == 0
    err = capsys.readouterr()
    assert "hit rate" in err.out and "Belady" in err.out
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["disk_gbps"] == 1.5 and summary["cache_slots"] == 4
    for name in ("p.png", "p.hit_layers.png", "p.hit_cache.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_refusal_on_the_command_line(moe_gguf, capsys):
    from weightstream.engine.cli.main import main

    assert main(["run", str(moe_gguf), "-p", "Hi", "--memory-budget", "64KiB"]) == 1
    assert "memory budget 64.00 KiB is too small" in capsys.readouterr().err
