"""Pipeline stages on a local Ray cluster (engine/runtime/distributed.py): two stages, each streaming its
own experts under its own budget, give the single-process engine's logits and tokens bit for bit
over both transports; a stage killed mid-generation raises StageFailedError naming it and the
other stages are shut down; bad configurations are refused before any actor starts; the placement
solver gives fewer layers to a slow disk or a small budget."""
import re
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine import Engine  # noqa: E402
from weightstream.engine.stream.budget import BudgetError, plan_memory  # noqa: E402
from weightstream.engine.model.config import ModelConfig  # noqa: E402
from weightstream.engine.runtime.distributed import DistributedConfig, StageCost, StageFailedError, place_layers  # noqa: E402
from weightstream.engine.formats.gguf_file import GGUFFile  # noqa: E402
from tests.hf_models import make_hf_model, smollm2_gguf_path  # noqa: E402

if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)

pytestmark = pytest.mark.distributed

N_BATCH = 16  # the same prompt batch on both sides: the kernels round per batch
N_LAYER = 4
OPTS = dict(n_ctx=64, n_batch=N_BATCH, threads=1)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster on loopback with 2 CPUs, for this module only."""
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def moe4(tmp_path_factory) -> Path:
    """A random-init qwen3moe of 4 layers (8 experts, top-2) in Q8_0 GGUF."""
    from weightstream.engine.tools.convert import convert_hf_to_gguf

    d = tmp_path_factory.mktemp("moe4")
    _, hf_dir = make_hf_model("qwen3moe", d / "hf", seed=1, num_hidden_layers=N_LAYER)
    return convert_hf_to_gguf(hf_dir, d / "model.gguf", "q8_0")


@pytest.fixture(scope="module")
def reference(moe4):
    """Single process, all resident: logits of 24 tokens, 12 greedy tokens, their text."""
    ids = np.random.default_rng(0).integers(0, 500, 24).tolist()
    with Engine.load(moe4, **OPTS) as eng:
        return ids, eng.logits(ids), list(eng.generate_tokens(ids[:8], 12)), eng.generate(ids[:8], 12)


def stage_budget(path, layers: range, slots: int) -> int:
    """A budget that holds the stage's resident part, KV cache and work buffers and `slots`
    expert slots (and half a slot more, which must not become a slot)."""
    with GGUFFile(path) as f:
        p = plan_memory(f, ModelConfig.from_metadata(f.metadata), budget=None, stream="experts", n_ctx=64,
                        cache_slots=0, direct_io=True, default_n_ctx=64, n_batch=N_BATCH, layers=layers, ends=False)
    return p.resident + p.kv_cache + p.work + slots * p.slot_bytes + p.slot_bytes // 2


@pytest.mark.parametrize("transport,layer_ranges", [("compiled", None), ("actor", [(0, 1), (1, 4)])])
def test_two_stages_equal_single_process(cluster, moe4, reference, transport, layer_ranges):
    ids, logits, tokens, text = reference
    ranges = [range(*r) for r in (layer_ranges or [(0, 2), (2, 4)])]  # placed: equal disks, equal budgets
    budgets = [stage_budget(moe4, r, 3) for r in ranges]
    if layer_ranges is None:
        budgets = [max(budgets)] * 2
    cfg = DistributedConfig(stages=2, budgets=budgets, layer_ranges=layer_ranges, transport=transport,
                            timeout_s=30, disk_bps=None if layer_ranges else [1e9, 1e9])
    with Engine.load(moe4, stream="experts", prefetch="lookahead", profile=True, distributed=cfg, **OPTS) as eng:
        assert np.array_equal(eng.logits(ids), logits)
        assert list(eng.generate_tokens(ids[:8], 12)) == tokens
        assert eng.generate(ids[:8], 12) == text
        p = eng.stats()["pipeline"]
    assert p["transport"] == transport and p["hops"] == 3
    assert [s["layers"] for s in p["stages"]] == [[r.start, r.stop] for r in ranges]
    for s, budget in zip(p["stages"], budgets):
        assert s["budget"] == budget and s["memory"]["total"] <= budget
        assert s["experts"]["slots"] >= 3 and s["experts"]["misses"] > 0 and s["experts"]["bytes_read"] > 0
        assert s["steps"] > 0 and s["node"]["ip"]
        prof, x = s["profile"], s["experts"]  # each stage's own profiler agrees with its own store
        assert prof["hits"] + prof["late"] == x["hits"] + x["late"] and prof["misses"] == x["misses"]
        # the profiler counts a lookahead read when it lands, the store when the layer consumes it
        assert prof["read_bytes"] >= x["bytes_read"] and prof["decode_passes"] == 22
    d = p["latency"]["decode"]
    assert d["calls"] == 2 * 11 and d["tokens"] == 22 and len(d["stage_compute_ms"]) == 2
    assert d["round_trip_ms"] >= sum(d["stage_compute_ms"])


@pytest.mark.parametrize("transport", ["compiled", "actor"])
def test_killed_stage_raises_naming_it_and_shuts_the_rest_down(cluster, moe4, reference, transport):
    ids, logits, tokens, text = reference
    eng = Engine.load(moe4, stream="experts", distributed=DistributedConfig(stages=2, transport=transport,
                      layer_ranges=[(0, 2), (2, 4)], timeout_s=20), **OPTS)
    stages = list(eng.model.stages)
    gen = eng.generate_tokens(ids[:8], 12)
    assert [next(gen) for _ in range(3)] == tokens[:3]
    ray.kill(stages[1])
    with pytest.raises(StageFailedError, match=r"stage 1 \(layers 2-3\) on node \S+ \(\w+\) died"):
        list(gen)
    with pytest.raises(ray.exceptions.RayActorError):  # the other stage was shut down too
        ray.get(stages[0].ping.remote(), timeout=20)
    with pytest.raises(StageFailedError, match="shut down"):
        eng.logits(ids[:4])
    eng.close()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stages=5), ValueError, "5 stages but the model has only 4 layers"),
    (dict(stages=0), ValueError, "stages must be a positive integer"),
    (dict(layer_ranges=[(0, 2), (3, 4)]), ValueError, re.escape("stage 1 is (3, 4), expected to start at 2")),
    (dict(layer_ranges=[(0, 2), (2, 3)]), ValueError, "end at layer 3, the model has 4 layers"),
    (dict(layer_ranges=[(0, 4)]), ValueError, "layer_ranges has 1 entries for 2 stages"),
    (dict(budgets=["1GiB"]), ValueError, "budgets has 1 entries for 2 stages"),
    (dict(transport="sockets"), ValueError, "transport must be one of"),
    (dict(budgets=["1 parsec", "1GiB"]), ValueError, "memory size '1 parsec' not understood"),
    (dict(layer_ranges=[(0, 2), (2, 4)], budgets=["64KiB", "1GiB"]), BudgetError,
     r"stage 0 \(layers 0-1\): .*memory budget 64.00 KiB is too small"),
])
def test_bad_configs_are_refused(cluster, moe4, kwargs, error, match):
    with pytest.raises(error, match=match):
        Engine.load(moe4, stream="experts", distributed=DistributedConfig(**kwargs), **OPTS)
    # nothing left behind: no placement group still holding the CPUs
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_placement_gives_fewer_layers_to_a_slow_disk_or_a_small_budget(moe4):
    with GGUFFile(moe4) as f:
        cfg = ModelConfig.from_metadata(f.metadata)
        kw = dict(stream="experts", n_ctx=64, cache_slots=2, dequantize_resident=None, default_n_ctx=64,
                  n_batch=N_BATCH)
        even, t_even = place_layers(f, cfg, [StageCost(None, 1e9), StageCost(None, 1e9)], kw)
        slow, t_slow = place_layers(f, cfg, [StageCost(None, 1e9), StageCost(None, 1e7)], kw)
        kw["cache_slots"] = None  # slots: what each budget leaves
        small = stage_budget(moe4, range(0, 1), 2)  # one layer and two slots: no more
        tight, _ = place_layers(f, cfg, [StageCost(small, 1e9), StageCost(None, 1e9)], kw)
        with pytest.raises(BudgetError, match="no split of 4 layers over 2 stages fits"):
            place_layers(f, cfg, [StageCost(small, 1e9), StageCost(small, 1e9)], kw)
    assert even == [range(0, 2), range(2, 4)] and t_even[0] == pytest.approx(t_even[1])
    assert slow == [range(0, 3), range(3, 4)] and max(t_slow) > max(t_even)
    assert tight == [range(0, 1), range(1, 4)]


def test_only_the_distributed_module_imports_ray():
    root = Path(__file__).resolve().parents[1]
    importers = [p.relative_to(root).as_posix() for d in ("engine", "kernels") for p in (root / d).rglob("*.py")
                 if re.search(r"^\s*(import ray|from ray)\b", p.read_text(), re.M)]
    assert importers == ["engine/runtime/distributed.py"]


def test_cli_runs_the_pipeline(cluster, moe4, capsys):
    from weightstream.engine.cli.main import main

    base = ["run", str(moe4), "-p", "Hello there", "-n", "6", "-c", "64", "-b", str(N_BATCH), "-t", "1"]
    assert main(base) == 0
    single = capsys.readouterr().out
    assert main(base + ["--stages", "2", "--stage-budgets", "64MiB,64MiB", "--transport", "actor",
                        "--cache-slots", "4"]) == 0
    out = capsys.readouterr()
    assert out.out == single
    assert "[pipeline: 2 stages over actor" in out.err and "[stage 1: layers " in out.err


def test_two_stages_run_a_hybrid_with_its_recurrent_state(cluster, tmp_path_factory):
    """A Qwen3.5 MoE hybrid split 2 + 2 layers: each stage carries its layers' recurrent states
    and KV caches from one call to the next, giving the single process's logits and tokens."""
    from tests.test_qwen35_hybrid import hybrid_model

    _, path = hybrid_model("qwen35moe", tmp_path_factory, "q8_0")
    ids = np.random.default_rng(1).integers(0, 500, 20).tolist()
    with Engine.load(path, **OPTS) as eng:
        logits, tokens = eng.logits(ids), list(eng.generate_tokens(ids[:8], 10))
    cfg = DistributedConfig(stages=2, layer_ranges=[(0, 2), (2, 4)], timeout_s=60)
    with Engine.load(path, stream="experts", distributed=cfg, **OPTS) as eng:
        assert np.array_equal(eng.logits(ids), logits)
        assert list(eng.generate_tokens(ids[:8], 10)) == tokens
