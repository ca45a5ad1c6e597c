"""weightstream synth: synthetic MoE GGUFs with real models' tensor shapes.

Shapes are checked against the real models' configs for every preset without writing; files are
written only for 1-layer slices of the two smallest presets (~0.3 and ~0.6 GB), and for 4-layer
slices of the hybrid presets scaled down to a few MB, and deleted after.
"""
import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize

from weightstream.engine.tools import synth
from weightstream.engine.cli.main import main as cli_main

# The real models' configs (config.json), independent of engine/tools/synth.py's presets:
# layers, hidden, q rows (heads*head_dim), kv rows, head_dim, experts, expert FFN, vocab,
# q/k norm length (None: no q/k norm), q/k/v biases, shared expert FFN (0: none)
REAL = {
    "qwen3-30b-a3b": dict(arch="qwen3moe", layers=48, hidden=2048, q=32 * 128, kv=4 * 128, experts=128, ff=768,
                          vocab=151936, qk_norm=(128, 128), bias=False, shexp=0),
    "qwen3-235b-a22b": dict(arch="qwen3moe", layers=94, hidden=4096, q=64 * 128, kv=4 * 128, experts=128, ff=1536,
                            vocab=151936, qk_norm=(128, 128), bias=False, shexp=0),
    "mixtral-8x7b": dict(arch="llama", layers=32, hidden=4096, q=32 * 128, kv=8 * 128, experts=8, ff=14336,
                         vocab=32000, qk_norm=None, bias=False, shexp=0),
    "olmoe-1b-7b": dict(arch="olmoe", layers=16, hidden=2048, q=16 * 128, kv=16 * 128, experts=64, ff=1024,
                        vocab=50304, qk_norm=(2048, 2048), bias=False, shexp=0),
}
# The Qwen3-Next family (published config.json, text model): layers, hidden, query heads x head_dim,
# kv heads, linear attention's key / value heads (all of 128), experts, expert FFN, shared expert
# FFN, top-k, vocab
HYBRID_REAL = {
    "qwen3.5-397b-a17b": dict(arch="qwen35moe", layers=60, hidden=4096, q=32 * 256, kv=2 * 256, k_heads=16,
                              v_heads=64, experts=512, ff=1024, shexp=1024, top_k=10, vocab=248320),
    "qwen3.5-35b-a3b": dict(arch="qwen35moe", layers=40, hidden=2048, q=16 * 256, kv=2 * 256, k_heads=16,
                            v_heads=32, experts=256, ff=512, shexp=512, top_k=8, vocab=248320),
    "qwen3-next-80b-a3b": dict(arch="qwen3next", layers=48, hidden=2048, q=16 * 256, kv=2 * 256, k_heads=16,
                               v_heads=32, experts=512, ff=512, shexp=512, top_k=10, vocab=151936),
}


def test_presets_are_the_real_models():
    assert set(synth.PRESETS) == set(REAL) | set(HYBRID_REAL)


@pytest.mark.parametrize("name", sorted(REAL))
def test_plan_has_the_real_shapes(name):
    r = REAL[name]
    assert synth.PRESETS[name].arch == r["arch"]
    tensors = synth.plan(name)
    by_name = {t.name: t for t in tensors}
    assert len(by_name) == len(tensors)
    assert {n.split(".")[1] for n in by_name if n.startswith("blk.")} == {str(i) for i in range(r["layers"])}

    E, X, F = r["hidden"], r["experts"], r["ff"]
    expected = {
        "token_embd.weight": (QT.Q4_K, (r["vocab"], E)),
        "output.weight": (QT.Q6_K, (r["vocab"], E)),
        "output_norm.weight": (QT.F32, (E,)),
    }
    last = r["layers"] - 1
    for i in (0, last):
        p = f"blk.{i}."
        expected.update({
            p + "attn_norm.weight": (QT.F32, (E,)), p + "ffn_norm.weight": (QT.F32, (E,)),
            p + "attn_q.weight": (QT.Q4_K, (r["q"], E)), p + "attn_k.weight": (QT.Q4_K, (r["kv"], E)),
            p + "attn_v.weight": (QT.Q4_K, (r["kv"], E)), p + "attn_output.weight": (QT.Q4_K, (E, r["q"])),
            p + "ffn_gate_inp.weight": (QT.F32, (X, E)),
            p + "ffn_gate_exps.weight": (QT.Q2_K, (X, F, E)),
            p + "ffn_up_exps.weight": (QT.Q2_K, (X, F, E)),
            p + "ffn_down_exps.weight": (QT.Q2_K, (X, E, F)),
        })
        if r["qk_norm"]:
            expected[p + "attn_q_norm.weight"] = (QT.F32, (r["qk_norm"][0],))
            expected[p + "attn_k_norm.weight"] = (QT.F32, (r["qk_norm"][1],))
        if r["bias"]:
            expected.update({p + "attn_q.bias": (QT.F32, (r["q"],)), p + "attn_k.bias": (QT.F32, (r["kv"],)),
                             p + "attn_v.bias": (QT.F32, (r["kv"],))})
        if r["shexp"]:
            S = r["shexp"]
            expected.update({p + "ffn_gate_inp_shexp.weight": (QT.F32, (1, E)),
                             p + "ffn_gate_shexp.weight": (QT.Q4_K, (S, E)),
                             p + "ffn_up_shexp.weight": (QT.Q4_K, (S, E)),
                             p + "ffn_down_shexp.weight": (QT.Q4_K, (E, S))})
    for tensor_name, (qtype, shape) in expected.items():
        t = by_name[tensor_name]
        assert (t.qtype, t.shape) == (qtype, shape), tensor_name
    per_layer = {n.split(".", 2)[2] for n in by_name if n.startswith("blk.0.")}
    assert per_layer == {n.split(".", 2)[2] for n in expected if n.startswith("blk.0.")}  # nothing else


def hybrid_layer(r: dict, i: int, linear: bool) -> dict[str, tuple]:
    """Layer i's tensors in a hybrid preset: (type, NumPy shape) by name, as llama.cpp's qwen35moe /
    qwen3next loaders create them (src/models/qwen35moe.cpp, qwen3next.cpp)."""
    E, X, F, S = r["hidden"], r["experts"], r["ff"], r["shexp"]
    qk, v = r["k_heads"] * 128, r["v_heads"] * 128
    p = f"blk.{i}."
    layer = {p + "attn_norm.weight": (QT.F32, (E,)), p + "post_attention_norm.weight": (QT.F32, (E,))}
    if linear:
        layer.update({
            p + "attn_qkv.weight": (QT.Q4_K, (2 * qk + v, E)), p + "attn_gate.weight": (QT.Q4_K, (v, E)),
            p + "ssm_conv1d.weight": (QT.F32, (2 * qk + v, 4)), p + "ssm_dt.bias": (QT.F32, (r["v_heads"],)),
            p + "ssm_a": (QT.F32, (r["v_heads"],)), p + "ssm_norm.weight": (QT.F32, (128,)),
            p + "ssm_out.weight": (QT.Q4_K, (E, v)),
        })
        if r["arch"] == "qwen3next":  # beta and alpha in one projection
            layer[p + "ssm_ba.weight"] = (QT.Q4_K, (2 * r["v_heads"], E))
        else:
            layer[p + "ssm_beta.weight"] = layer[p + "ssm_alpha.weight"] = (QT.Q4_K, (r["v_heads"], E))
    else:  # gated attention: query and output gate per head
        layer.update({
            p + "attn_q.weight": (QT.Q4_K, (2 * r["q"], E)), p + "attn_k.weight": (QT.Q4_K, (r["kv"], E)),
            p + "attn_v.weight": (QT.Q4_K, (r["kv"], E)), p + "attn_output.weight": (QT.Q4_K, (E, r["q"])),
            p + "attn_q_norm.weight": (QT.F32, (256,)), p + "attn_k_norm.weight": (QT.F32, (256,)),
        })
    layer.update({
        p + "ffn_gate_inp.weight": (QT.F32, (X, E)),
        p + "ffn_gate_exps.weight": (QT.Q2_K, (X, F, E)), p + "ffn_up_exps.weight": (QT.Q2_K, (X, F, E)),
        p + "ffn_down_exps.weight": (QT.Q2_K, (X, E, F)),
        p + "ffn_gate_inp_shexp.weight": (QT.F32, (1, E)),
        p + "ffn_gate_shexp.weight": (QT.Q4_K, (S, E)), p + "ffn_up_shexp.weight": (QT.Q4_K, (S, E)),
        p + "ffn_down_shexp.weight": (QT.Q4_K, (E, S)),
    })
    return layer


@pytest.mark.parametrize("name", sorted(HYBRID_REAL))
def test_hybrid_plan_has_the_real_shapes(name):
    """A 4-layer slice: 3 linear-attention layers, then 1 attention layer, every tensor at full size."""
    r = HYBRID_REAL[name]
    assert synth.PRESETS[name].arch == r["arch"]
    tensors = synth.plan(name, layers=4)
    expected = {"token_embd.weight": (QT.Q4_K, (r["vocab"], r["hidden"]))}
    for i in range(4):
        expected.update(hybrid_layer(r, i, linear=i != 3))
    expected.update({"output_norm.weight": (QT.F32, (r["hidden"],)),
                     "output.weight": (QT.Q6_K, (r["vocab"], r["hidden"]))})
    assert sorted(t.name for t in tensors) == sorted(expected)  # nothing else
    for t in tensors:
        assert (t.qtype, t.shape) == expected[t.name], t.name
    full = {t.name for t in synth.plan(name)}  # all layers: every 4th is attention
    assert {n.split(".")[1] for n in full if n.startswith("blk.")} == {str(i) for i in range(r["layers"])}
    assert f"blk.{r['layers'] - 1}.attn_q.weight" in full and f"blk.{r['layers'] - 2}.attn_qkv.weight" in full


def test_plan_layers_and_types():
    tensors = synth.plan("qwen3.5-397b-a17b", layers=2, attn_type="q2_k")
    assert {n.name.split(".")[1] for n in tensors if n.name.startswith("blk.")} == {"0", "1"}
    assert next(t for t in tensors if t.name == "blk.1.attn_qkv.weight").qtype == QT.Q2_K
    assert next(t for t in tensors if t.name == "blk.1.ssm_out.weight").qtype == QT.Q2_K
    expert_bytes = sum(t.nbytes for t in tensors if t.name.startswith("blk.0.") and "_exps." in t.name)
    assert expert_bytes == 3 * 512 * 4096 * 1024 // 256 * 84  # 2.1 GB of Q2_K per layer
    with pytest.raises(ValueError, match="between 1 and 60"):
        synth.plan("qwen3.5-397b-a17b", layers=61)


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q4_K, QT.Q6_K])
def test_random_blocks_have_the_wanted_std(qtype):
    in_features = 4096
    t = synth.PlannedTensor("blk.0.x.weight", qtype, (64, in_features))
    data = b"".join(c.tobytes() for c in synth.tensor_chunks(t, seed=1))
    w = dequantize(np.frombuffer(data, np.uint8).reshape(64, -1), qtype)
    assert np.isfinite(w).all()
    assert abs(w.std() * np.sqrt(in_features) - 1) < 0.05
    assert abs(w.mean()) < 0.1 * w.std()


def test_contents_depend_on_seed_and_name_not_chunking():
    t = synth.PlannedTensor("blk.0.ffn_up_exps.weight", QT.Q2_K, (4, 64, 2048))

    def data(seed, chunk_bytes=synth.CHUNK_BYTES, name=t.name):
        return b"".join(c.tobytes() for c in synth.tensor_chunks(t._replace(name=name), seed, chunk_bytes))

    assert len(data(0)) == t.nbytes
    assert data(0) == data(0, chunk_bytes=84 * 8 * 3)
    assert data(0) != data(1)
    assert data(0) != data(0, name="blk.1.ffn_up_exps.weight")


def test_vocab_padded_and_truncated(demo_model):
    from weightstream.engine.formats.tokenizer import Tokenizer

    source = synth.demo_tokenizer()
    tokens, types, merges = (source["tokenizer.ggml.tokens"], source["tokenizer.ggml.token_type"],
                             source["tokenizer.ggml.merges"])
    padded = synth.fit_vocab(tokens, types, merges, len(tokens) + 3)
    assert padded[0][-3:] == [f"<|synth_pad_{len(tokens) + i}|>" for i in range(3)]
    assert padded[1][-3:] == [TokenType.UNUSED] * 3 and padded[2] == merges

    small = synth.fit_vocab(tokens, types, merges, 32000)  # Mixtral's vocabulary is smaller than SmolLM2's
    assert len(small[0]) == len(small[1]) == 32000 and 0 < len(small[2]) < len(merges)
    kept = set(small[0])
    assert all(a in kept and b in kept and a + b in kept for a, b in (m.split(" ") for m in small[2]))
    meta = {**source, "tokenizer.ggml.tokens": small[0], "tokenizer.ggml.token_type": small[1],
            "tokenizer.ggml.merges": small[2]}
    tok = Tokenizer.from_metadata(meta)
    ids = tok.encode("Hello world, synthetic model.", add_special=False)
    assert max(ids) < 32000 and tok.decode(ids) == "Hello world, synthetic model."


# The keys llama.cpp's loader reads for each architecture (llama-model.cpp load_hparams, load_tensors)
LLAMA_CPP_KEYS = {
    "qwen3-235b-a22b": {"qwen3moe.expert_feed_forward_length": 1536, "qwen3moe.block_count": 94,
                        "qwen3moe.attention.key_length": 128, "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6},
    "mixtral-8x7b": {"llama.feed_forward_length": 14336, "llama.expert_count": 8, "llama.expert_used_count": 2,
                     "llama.vocab_size": 32000, "llama.rope.dimension_count": 128, "llama.rope.freq_base": 1e6,
                     "llama.attention.head_count_kv": 8, "llama.context_length": 32768},
    "olmoe-1b-7b": {"olmoe.feed_forward_length": 1024, "olmoe.expert_count": 64,
                    "olmoe.attention.layer_norm_rms_epsilon": 1e-5},
    # the Qwen3-Next family: src/models/qwen35moe.cpp and qwen3next.cpp load_arch_hparams
    "qwen3.5-397b-a17b": {
        "qwen35moe.expert_feed_forward_length": 1024, "qwen35moe.expert_shared_feed_forward_length": 1024,
        "qwen35moe.expert_count": 512, "qwen35moe.expert_used_count": 10, "qwen35moe.block_count": 60,
        "qwen35moe.attention.head_count": 32, "qwen35moe.attention.head_count_kv": 2,
        "qwen35moe.attention.key_length": 256, "qwen35moe.attention.value_length": 256,
        "qwen35moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen35moe.rope.freq_base": 1e7,
        "qwen35moe.rope.dimension_count": 64, "qwen35moe.rope.dimension_sections": [11, 11, 10, 0],
        "qwen35moe.ssm.conv_kernel": 4, "qwen35moe.ssm.state_size": 128, "qwen35moe.ssm.group_count": 16,
        "qwen35moe.ssm.time_step_rank": 64, "qwen35moe.ssm.inner_size": 64 * 128,
        "qwen35moe.full_attention_interval": 4,
        "qwen35moe.attention.recurrent_layers": [(i + 1) % 4 != 0 for i in range(60)],
        "qwen35moe.context_length": 262144, "qwen35moe.feed_forward_length": None,
        "qwen35moe.expert_weights_norm": None, "qwen35moe.nextn_predict_layers": None},
    "qwen3.5-35b-a3b": {
        "qwen35moe.expert_feed_forward_length": 512, "qwen35moe.expert_shared_feed_forward_length": 512,
        "qwen35moe.expert_count": 256, "qwen35moe.expert_used_count": 8, "qwen35moe.block_count": 40,
        "qwen35moe.attention.head_count": 16, "qwen35moe.ssm.time_step_rank": 32,
        "qwen35moe.ssm.inner_size": 32 * 128, "qwen35moe.rope.dimension_sections": [11, 11, 10, 0]},
    "qwen3-next-80b-a3b": {
        "qwen3next.expert_feed_forward_length": 512, "qwen3next.expert_shared_feed_forward_length": 512,
        "qwen3next.expert_count": 512, "qwen3next.expert_used_count": 10, "qwen3next.block_count": 48,
        "qwen3next.attention.head_count": 16, "qwen3next.attention.head_count_kv": 2,
        "qwen3next.rope.dimension_count": 64, "qwen3next.rope.freq_base": 1e7, "qwen3next.feed_forward_length": 5120,
        "qwen3next.ssm.state_size": 128, "qwen3next.ssm.group_count": 16, "qwen3next.ssm.time_step_rank": 32,
        "qwen3next.full_attention_interval": 4, "qwen3next.rope.dimension_sections": None,
        "qwen3next.expert_weights_norm": None},
}


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_KEYS))
def test_metadata_has_the_keys_llama_cpp_reads(name, demo_model):
    """Metadata only (writing these files takes GBs): the writer's key/value table."""
    from gguf import GGUFWriter

    p = synth.PRESETS[name]
    w = GGUFWriter(None, p.arch)
    for t in synth.plan(name):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    synth.write_metadata(w, p, p.n_layer, QT.Q2_K, 3, synth.demo_tokenizer())
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    for key, value in LLAMA_CPP_KEYS[name].items():
        if value is None:  # a key llama.cpp's converter does not write
            assert key not in kv, key
        elif isinstance(value, list):
            assert kv[key] == value, key
        else:
            assert kv[key] == pytest.approx(value), key
    assert kv["general.name"] == f"synth {name}" and kv["general.file_type"] == 10
    assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.token_type"]) == p.n_vocab


# ---- written files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def olmoe_file(tmp_path_factory, demo_model):
    """olmoe-1b-7b, 1 layer, written through the command line."""
    path = tmp_path_factory.mktemp("synth") / "olmoe.gguf"
    assert cli_main(["synth", "--arch", "olmoe", "--preset", "olmoe-1b-7b", "--layers", "1", "--seed", "7",
                     "--quiet", str(path)]) == 0
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def qwen3_file(tmp_path_factory, demo_model):
    path = tmp_path_factory.mktemp("synth") / "qwen3.gguf"
    assert synth.synth_model(path, "qwen3-30b-a3b", layers=1, progress=False) == path
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("which", ["olmoe", "qwen3"])
def test_file_reads_back_with_gguf(which, olmoe_file, qwen3_file):
    path, preset, seed = (olmoe_file, "olmoe-1b-7b", 7) if which == "olmoe" else (qwen3_file, "qwen3-30b-a3b", 0)
    p = synth.PRESETS[preset]
    reader = GGUFReader(path)
    assert not list(path.parent.glob(".*.tmp"))
    planned = synth.plan(preset, layers=1)
    assert [t.name for t in reader.tensors] == [t.name for t in planned]
    for t, want in zip(reader.tensors, planned):
        assert t.tensor_type == want.qtype and tuple(int(n) for n in reversed(t.shape)) == want.shape, t.name
        assert t.n_bytes == want.nbytes and t.data_offset % 32 == 0

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == p.arch
    assert field("general.name") == f"synth {preset} (1 of {p.n_layer} layers)"
    assert field("general.file_type") == 10  # MOSTLY_Q2_K
    assert field(f"{p.arch}.block_count") == 1
    assert field(f"{p.arch}.expert_count") == p.n_expert
    assert field(f"{p.arch}.attention.key_length") == p.head_dim
    assert field("weightstream.synth.preset") == preset and field("weightstream.synth.seed") == seed
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == p.n_vocab and tokens[-1] == f"<|synth_pad_{p.n_vocab - 1}|>"
    assert field("tokenizer.ggml.token_type")[-1] == TokenType.UNUSED
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.eos_token_id") == 2


def tiny_hybrid(name: str) -> synth.Preset:
    """A hybrid preset at a few MB: its architecture, layer pattern and value heads per key head, 256
    wide with 8 experts and a 1024-token vocabulary (every quantized row still a multiple of 256)."""
    p = synth.PRESETS[name]
    per_k = p.linear.n_v_heads // p.linear.n_k_heads
    return dataclasses.replace(
        p, name=f"{name}-tiny", n_embd=256, n_head=2, n_head_kv=1, head_dim=128, n_expert=8, n_expert_used=2,
        n_ff_exp=256, n_ff_shexp=256, n_vocab=1024, n_ff=p.n_ff and 512,
        linear=dataclasses.replace(p.linear, n_k_heads=2, n_v_heads=2 * per_k, head_dim=64))


@pytest.mark.parametrize("name", sorted(HYBRID_REAL))
def test_hybrid_slice_reads_back(name, tmp_path, demo_model):
    """`--layers 4` of a hybrid: 3 linear-attention layers and 1 attention layer, with the keys
    llama.cpp's loader reads, and contents in the ranges its math expects."""
    p = tiny_hybrid(name)
    path = synth.synth_model(tmp_path / "h.gguf", p, layers=4, progress=False)
    reader = GGUFReader(path)
    planned = synth.plan(p, layers=4)
    assert [t.name for t in reader.tensors] == [t.name for t in planned]
    for t, want in zip(reader.tensors, planned):
        assert t.tensor_type == want.qtype and tuple(int(n) for n in reversed(t.shape)) == want.shape, t.name
        assert t.n_bytes == want.nbytes
    names = {t.name for t in planned}
    assert {"blk.0.attn_qkv.weight", "blk.2.ssm_out.weight", "blk.3.attn_q.weight"} <= names
    assert "blk.3.attn_qkv.weight" not in names and "blk.0.attn_q.weight" not in names

    def field(key):
        f = reader.fields.get(f"{p.arch}.{key}") or reader.fields.get(key)
        return None if f is None else f.contents()

    v_heads = p.linear.n_v_heads
    assert field("general.architecture") == p.arch
    assert field("general.name") == f"synth {p.name} (4 of {p.n_layer} layers)"
    assert (field("block_count"), field("full_attention_interval")) == (4, 4)
    assert field("attention.recurrent_layers") == [True, True, True, False]
    assert (field("ssm.conv_kernel"), field("ssm.state_size"), field("ssm.group_count"),
            field("ssm.time_step_rank"), field("ssm.inner_size")) == (4, 64, 2, v_heads, v_heads * 64)
    assert field("rope.dimension_count") == 128 // 4
    assert field("rope.dimension_sections") == ([11, 11, 10, 0] if p.arch == "qwen35moe" else None)
    assert (field("expert_feed_forward_length"), field("expert_shared_feed_forward_length")) == (256, 256)
    assert field("expert_weights_norm") is None and field("nextn_predict_layers") is None

    tensors = {t.name: t.data for t in reader.tensors}
    a = tensors["blk.0.ssm_a"]
    assert a.shape == (v_heads,) and np.all((-8 <= a) & (a <= -0.5))  # A = -exp(A_log) < 0
    assert np.all(np.abs(tensors["blk.0.ssm_dt.bias"]) < 1)
    np.testing.assert_array_equal(tensors["blk.0.ssm_norm.weight"], np.ones(64, np.float32))
    conv = tensors["blk.0.ssm_conv1d.weight"]
    assert conv.dtype == np.float32 and abs(conv.std() - 0.5) < 0.05  # 1/sqrt(kernel)


def test_qwen3_metadata_matches_llama_cpp_keys(qwen3_file):
    from weightstream.engine.formats.gguf_file import GGUFFile

    with GGUFFile(qwen3_file) as f:
        m = f.metadata
    assert m["qwen3moe.expert_feed_forward_length"] == 768 and m["qwen3moe.expert_used_count"] == 8
    assert m["qwen3moe.attention.head_count"] == 32 and m["qwen3moe.attention.head_count_kv"] == 4
    assert m["qwen3moe.context_length"] == 40960 and m["qwen3moe.rope.freq_base"] == 1e6
    assert "general.alignment" not in m  # the default, 32


@pytest.mark.parametrize("which", ["olmoe", "qwen3"])
def test_file_runs_in_the_engine(which, olmoe_file, qwen3_file):
    from weightstream.engine import Engine

    with Engine.load(olmoe_file if which == "olmoe" else qwen3_file, n_ctx=64) as engine:
        logits = engine.logits([1, 2, 3])
        assert logits.shape[1] == engine.config.n_vocab and np.isfinite(logits).all()
        assert 0.1 < logits.std() < 10  # weights scaled by 1/sqrt(in): logits stay O(1)
        assert isinstance(engine.generate("Hello", max_new_tokens=4), str)


def test_expert_dequantizes_to_the_wanted_scale(qwen3_file):
    from weightstream.engine.formats.gguf_file import GGUFFile

    with GGUFFile(qwen3_file) as f:  # its index parses the 151936-token vocabulary faster than GGUFReader
        for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight"):
            w = dequantize(f.raw(name)[5], f.info(name).qtype)  # expert 5: float32[rows, in_features]
            assert np.isfinite(w).all()
            target = 1 / np.sqrt(w.shape[-1])
            assert target / 3 < w.std() < target * 3


# ---- failures -------------------------------------------------------------------------------


def test_unknown_preset_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="known presets: qwen3-30b-a3b, .*olmoe-1b-7b"):
        synth.synth_model(tmp_path / "x.gguf", "qwen4-1t", progress=False)
    assert cli_main(["synth", "--preset", "qwen4-1t", str(tmp_path / "x.gguf")]) == 1
    assert "known presets" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_arch_must_match_the_preset(tmp_path, capsys):
    assert cli_main(["synth", "--arch", "llama", "--preset", "qwen3-30b-a3b", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "--arch llama does not match preset qwen3-30b-a3b" in err and "qwen3moe" in err
    assert not list(tmp_path.iterdir())


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, demo_model):
    calls = []

    def failing_write(f, chunk):
        calls.append(chunk.nbytes)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        f.write(memoryview(chunk))

    monkeypatch.setattr(synth, "write_chunk", failing_write)
    out = tmp_path / "x.gguf"
    with pytest.raises(OSError, match="disk full"):
        synth.synth_model(out, "olmoe-1b-7b", layers=1, progress=False)
    assert len(calls) == 3
    assert not list(tmp_path.iterdir())  # neither OUT nor the temporary file
