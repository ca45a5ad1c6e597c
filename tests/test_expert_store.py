"""engine/stream/store.py: experts read into a fixed slot pool equal the file's bytes, whatever
the pool size and policy, and the hit counts are the policy's (engine/cache_policy.simulate)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine.stream.policies import simulate  # noqa: E402
from weightstream.engine.stream.layout import expert_layouts  # noqa: E402
from weightstream.engine.stream.slots import SlotPool  # noqa: E402
from weightstream.engine.stream.store import ExpertStore  # noqa: E402
from weightstream.engine.formats.gguf_file import GGUFFile  # noqa: E402
from tests.hf_models import moe_gguf_file, smollm2_gguf_path  # noqa: E402

if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)


@pytest.fixture(scope="module", params=["qwen3moe", "mixtral"])
def moe_gguf(request, tmp_path_factory):
    return moe_gguf_file(request.param, tmp_path_factory.mktemp(request.param))


def routing_trace(f, n_tokens=40, top_k=2, seed=0):
    rng = np.random.default_rng(seed)
    layouts = expert_layouts(f)
    return [(layer, int(e)) for _ in range(n_tokens) for layer in sorted(layouts)
            for e in rng.choice(layouts[layer].n_expert, top_k, replace=False)]


def test_slots_are_page_aligned():
    pool = SlotPool(3, 5000)
    assert pool.stride % 4096 == 0 and pool.stride >= 5000
    assert all(pool.slots[i].ctypes.data % 4096 == 0 for i in range(3))
    pool.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "decay"])
@pytest.mark.parametrize("n_slots", [1, 3, 1000])
def test_streamed_experts_equal_the_file(moe_gguf, policy, n_slots):
    with GGUFFile(moe_gguf) as f:
        trace = routing_trace(f)
        store = ExpertStore(f, min(n_slots, len(set(trace))), policy)
        try:
            for layer, e in trace:
                got = store.get(layer, e)
                for part, name in zip(got, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
                    ref = f.expert_qtensors(f"blk.{layer}.{name}.weight")[e]
                    assert part.qtype == ref.qtype and part.shape == ref.shape
                    assert np.array_equal(part.data, ref.data), (layer, e, name)
            assert store.stats.hits == simulate(trace, store.n_slots, policy)
            assert store.stats.misses == len(trace) - store.stats.hits
            assert store.stats.expert_bytes == store.stats.misses * store.layouts[0].expert_bytes
            assert store.stats.bytes_read >= store.stats.expert_bytes
        finally:
            store.close()


def test_bad_expert_and_truncated_file(moe_gguf, tmp_path):
    with GGUFFile(moe_gguf) as f:
        store = ExpertStore(f, 2)
        with pytest.raises(KeyError, match="no expert 99 in layer 0"):
            store.get(0, 99)
        store.close()
        lay = expert_layouts(f)[max(expert_layouts(f))]
        last = lay.parts[2]  # the last layer's down experts: near the end of the file
    cut = tmp_path / "cut.gguf"
    data = moe_gguf.read_bytes()
    cut.write_bytes(data)
    with GGUFFile(cut) as f:
        store = ExpertStore(f, 2)
        with open(cut, "r+b") as fh:  # truncated after opening: the read finds it
            fh.truncate(last.offset + 10)
        with pytest.raises(OSError, match="short read of blk.* expert"):
            for e in range(lay.n_expert):
                store.get(lay.layer, e)
        store.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "decay"])
@pytest.mark.parametrize("slots", [1, 3])
def test_streamed_model_equals_resident_bit_for_bit(moe_gguf, policy, slots):
    from weightstream.engine import Engine

    ids = np.random.default_rng(0).integers(0, 500, 24).tolist()
    with Engine.load(moe_gguf, n_ctx=64) as resident, \
            Engine.load(moe_gguf, n_ctx=64, stream="experts", cache_slots=slots, cache_policy=policy) as streamed:
        assert np.array_equal(streamed.logits(ids), resident.logits(ids))
        assert list(streamed.generate_tokens(ids[:8], 12)) == list(resident.generate_tokens(ids[:8], 12))
        s = streamed.stats()["experts"]
        assert s["slots"] == slots and s["misses"] > 0 and s["bytes_read"] > 0


def test_stream_option_is_checked(moe_gguf):
    from weightstream.engine import Engine

    with pytest.raises(ValueError, match="stream must be one of .*, got 'layers'"):
        Engine.load(moe_gguf, stream="layers")
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        Engine.load(moe_gguf, stream="experts", cache_policy="mru")
