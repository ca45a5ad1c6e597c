"""weightstream.engine.tools.convert for the Qwen3-Next family (qwen35moe, qwen35, qwen3next), against
independent references: gguf's reader and name map, the safetensors the tiny transformers models
were saved to, and transformers' own code for qwen3next's fused projection. The conventions
llama.cpp applies (norms + 1, A = -exp(A_log), value heads in tiled order, in_proj_qkvz split) are
computed here a second way, not with the converter's functions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402

from weightstream.engine.tools.convert import convert_hf_to_gguf  # noqa: E402
from tests.hf_models import (  # noqa: E402
    GGUF_ARCH, HYBRID_CASES, cached_hf_model, make_hf_config, reinit_weights, save_tokenizer, smollm2_gguf_path)
from tests.test_convert import check_values, field, hf_tensors, read_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="SmolLM2 demo GGUF not available")

QT = gguf.GGMLQuantizationType
OUT_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
MATRIX = [(case, out_type) for case in HYBRID_CASES for out_type in OUT_TYPES]
N_LAYER, N_EMBD = 4, 64


# ------------------------------------------------------------------------------------------------
# fixtures and the expected tensors


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """case -> (transformers model, checkpoint directory), built once."""
    return lambda case: cached_hf_model(case, tmp_path_factory)


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    root, done = tmp_path_factory.mktemp("gguf"), {}

    def get(case: str, out_type: str) -> Path:
        if (case, out_type) not in done:
            done[case, out_type] = convert_hf_to_gguf(hf_model(case)[1], root / f"{case}-{out_type}.gguf", out_type)
        return done[case, out_type]

    return get


def tiled_heads(n_k: int, n_v: int) -> list[int]:
    """For each value head in llama.cpp's tiled order, the HF (grouped) head it comes from: tiled
    position p holds head p // n_k of key head p % n_k; HF keeps the n_v / n_k heads of a key head
    together."""
    per_k = n_v // n_k
    return [(p % n_k) * per_k + p // n_k for p in range(n_v)]


def heads_in_order(w: np.ndarray, order: list[int], axis: int = 0) -> np.ndarray:
    """w's heads (equal blocks along `axis`) in the given order."""
    return np.concatenate([np.split(w, len(order), axis=axis)[h] for h in order], axis=axis)


def qkvz_by_transformers(layer, w_qkvz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """qwen3next's in_proj_qkvz split the way transformers' forward splits the projection's output
    (Qwen3NextGatedDeltaNet.fix_query_key_value_ordering): with input x the rows of the identity,
    each output feature is one weight row, so the split outputs, transposed, are the split weights."""
    attn = layer.linear_attn
    n_ba = 2 * attn.num_v_heads
    with torch.no_grad():
        q, k, v, z, _, _ = attn.fix_query_key_value_ordering(torch.from_numpy(w_qkvz.T)[None],
                                                             torch.zeros(1, w_qkvz.shape[1], n_ba))
    rows = [t.reshape(w_qkvz.shape[1], -1).T.numpy() for t in (q, k, v, z)]
    return np.concatenate(rows[:3]), rows[3]


def expected_tensors(case: str, config: dict, hf_dir: Path, layers=None) -> dict[str, np.ndarray]:
    """GGUF name -> the array llama.cpp would write, from the checkpoint in hf_dir (a text model's
    names); `layers`: the transformers model's decoder layers (qwen3next needs their code)."""
    n_k, n_v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    qk_rows = 2 * n_k * config["linear_key_head_dim"]
    tiled = tiled_heads(n_k, n_v) if case != "qwen3next" else list(range(n_v))  # qwen3next keeps HF's order
    tmap = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCH[case]),
                                    N_LAYER)
    out, experts = {}, {}
    for name, w in hf_tensors(hf_dir).items():
        parts = name.split(".")
        if "experts" in parts:  # model.layers.N.mlp.experts.E.proj.weight -> stacked per layer
            i = parts.index("experts") + 1
            stacked = tmap.get_name(".".join(parts[:i] + parts[i + 1:]), try_suffixes=(".weight",))
            experts.setdefault(stacked, {})[int(parts[i])] = w
            continue
        if name.endswith("norm.weight") and "linear_attn" not in name:
            w = w + 1  # (1 + w) RMSNorm
        if name.endswith(".A_log"):
            w = -np.exp(heads_in_order(w, tiled))
        elif name.endswith(".dt_bias"):
            name, w = name.replace(".dt_bias", ".dt_proj.bias"), heads_in_order(w, tiled)
        elif name.endswith(("in_proj_a.weight", "in_proj_b.weight", "in_proj_z.weight")):
            w = heads_in_order(w, tiled)
        elif name.endswith("in_proj_qkv.weight"):
            w = np.concatenate([w[:qk_rows], heads_in_order(w[qk_rows:], tiled)])
        elif name.endswith("conv1d.weight"):
            w = w.reshape(w.shape[0], w.shape[2])
            w = np.concatenate([w[:qk_rows], heads_in_order(w[qk_rows:], tiled)])
        elif name.endswith("out_proj.weight"):
            w = heads_in_order(w, tiled, axis=1)
        elif name.endswith("in_proj_qkvz.weight"):
            blk = f"blk.{parts[2]}."
            out[blk + "attn_qkv.weight"], out[blk + "attn_gate.weight"] = qkvz_by_transformers(layers[int(parts[2])], w)
            continue
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        out[gguf_name] = w
    for name, by_index in experts.items():
        out[name] = np.stack([by_index[e] for e in sorted(by_index)])
    return out


def expected_type(name: str, shape: tuple[int, ...], out_type: str):
    if len(shape) == 1 or name.endswith(("_norm.weight", ".bias", ".ssm_conv1d.weight")) or ".ffn_gate_inp" in name:
        return QT.F32
    return OUT_TYPES[out_type]


def check_tensors(r, want: dict[str, np.ndarray], out_type: str) -> None:
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        shape = want[name].shape
        assert list(t.shape) == list(reversed(shape)), name  # GGUF's ne[] is NumPy's shape reversed
        assert t.tensor_type == expected_type(name, shape, out_type), name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if name.endswith(".ssm_a"):  # exp: numpy and torch may differ in the last bit
            np.testing.assert_allclose(values, want[name], rtol=1e-6, err_msg=name)
        else:
            check_values(name, values, want[name], t.tensor_type)


# ------------------------------------------------------------------------------------------------
# metadata


def expected_keys(case: str, config: dict) -> dict:
    """Every {arch}.* key llama.cpp's converter writes for the case (with --no-mtp), and its value."""
    layer_types = config["layer_types"]
    want = {
        "block_count": N_LAYER, "context_length": 256, "embedding_length": N_EMBD, "attention.head_count": 4,
        "attention.head_count_kv": 2, "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-6,
        "attention.key_length": 32, "attention.value_length": 32,
        "ssm.conv_kernel": 4, "ssm.state_size": 16, "ssm.group_count": 2, "ssm.time_step_rank": 4,
        "ssm.inner_size": 4 * 16, "attention.recurrent_layers": [t == "linear_attention" for t in layer_types],
        # transformers turns full_attention_interval into layer_types and drops it, so llama.cpp
        # writes its default; its loader reads recurrent_layers first
        "full_attention_interval": 4,
        "rope.dimension_count": 32 // 4,  # head_dim * partial_rotary_factor (0.25)
    }
    if config.get("intermediate_size") is not None:  # Qwen3.5-MoE's config has none
        want["feed_forward_length"] = config["intermediate_size"]
    if case != "qwen35":
        want.update({"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 32,
                     "expert_shared_feed_forward_length": 64})
    if case != "qwen3next":  # qwen35's MRoPE: the mrope_section, else Qwen3.5's [11, 11, 10] (+ 0)
        sections = config["rope_parameters"].get("mrope_section", [11, 11, 10])
        want["rope.dimension_sections"] = (sections + [0] * 4)[:4]
    return want


@pytest.mark.parametrize("case", list(HYBRID_CASES))
def test_metadata(case, hf_model, converted):
    hf = hf_model(case)[1]
    config = json.loads((hf / "config.json").read_text())
    r = read_gguf(converted(case, "f16"))
    arch = GGUF_ARCH[case]
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == FILE_TYPES["f16"]
    want = expected_keys(case, config)
    got = {k[len(arch) + 1:]: field(r, k) for k in r.fields if k.startswith(arch + ".")}
    assert sorted(got) == sorted(want)  # nothing else: no nextn_predict_layers, no expert_weights_norm
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(field(r, "tokenizer.ggml.tokens")) == config["vocab_size"]


def test_layer_types_follow_the_config(hf_model):
    """The cases cover the ways a config says which layers are attention."""
    types = {case: hf_model(case)[0].config.layer_types for case in HYBRID_CASES}
    assert types["qwen35moe"] == ["linear_attention"] * 3 + ["full_attention"]  # the default interval, 4
    assert types["qwen35"] == ["linear_attention", "full_attention"] * 2  # full_attention_interval=2
    assert types["qwen3next"] == ["full_attention", "linear_attention", "linear_attention", "full_attention"]


# ------------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("case,out_type", MATRIX, ids=[f"{c}-{o}" for c, o in MATRIX])
def test_tensors(case, out_type, hf_model, converted):
    model, hf = hf_model(case)
    r = read_gguf(converted(case, out_type))
    assert field(r, "general.file_type") == FILE_TYPES[out_type]
    want = expected_tensors(case, json.loads((hf / "config.json").read_text()), hf, model.model.layers)
    check_tensors(r, want, out_type)

    # the layout llama.cpp's loader creates (src/models/qwen35moe.cpp, qwen35.cpp, qwen3next.cpp)
    attention = model.config.layer_types.index("full_attention")
    linear = f"blk.{model.config.layer_types.index('linear_attention')}."
    assert want[linear + "ssm_conv1d.weight"].shape == (2 * 2 * 16 + 4 * 16, 4)  # [q k v channels, kernel]
    assert want[f"blk.{attention}.attn_q.weight"].shape == (2 * 4 * 32, N_EMBD)  # query and gate per head
    assert f"blk.{attention}.attn_qkv.weight" not in want and linear + "attn_q.weight" not in want
    assert f"blk.{attention}.post_attention_norm.weight" in want and "blk.0.ffn_norm.weight" not in want
    if case == "qwen3next":
        assert want[linear + "ssm_ba.weight"].shape == (2 * 4, N_EMBD) and linear + "ssm_beta.weight" not in want
    else:
        assert want[linear + "ssm_beta.weight"].shape == (4, N_EMBD)
    if case != "qwen35":
        assert want["blk.0.ffn_gate_exps.weight"].shape == (8, 32, N_EMBD)
        assert want["blk.0.ffn_gate_inp_shexp.weight"].shape == (1, N_EMBD)  # as Qwen2MoeModel writes it


def test_conventions_change_the_values(hf_model):
    """The cases' weights make every convention visible (a converter that skipped one would fail)."""
    hf = hf_model("qwen35moe")[1]
    raw = hf_tensors(hf)
    want = expected_tensors("qwen35moe", json.loads((hf / "config.json").read_text()), hf)
    assert not np.allclose(want["blk.0.ssm_a"], raw["model.layers.0.linear_attn.A_log"])
    z = raw["model.layers.0.linear_attn.in_proj_z.weight"]
    assert not np.array_equal(want["blk.0.attn_gate.weight"], z)  # value heads moved
    np.testing.assert_array_equal(want["blk.0.attn_gate.weight"][16:32], z[32:48])  # tiled 1 = key head 1's head 0
    assert not np.allclose(want["blk.0.attn_norm.weight"], raw["model.layers.0.input_layernorm.weight"])
    np.testing.assert_array_equal(want["blk.0.ssm_norm.weight"], raw["model.layers.0.linear_attn.norm.weight"])


# ------------------------------------------------------------------------------------------------
# other checkpoint layouts


def test_fused_experts_convert_like_per_expert_ones(hf_model, converted, tmp_path):
    """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2*ff, n_embd], gate
    first; mlp.experts.down_proj), and save_pretrained splits them per expert; a checkpoint saved
    fused converts to the same file."""
    model, hf = hf_model("qwen35moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 32, N_EMBD)
    fused = tmp_path / "fused"
    fused.mkdir()
    safetensors.torch.save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(hf / name, fused / name)
    r = read_gguf(convert_hf_to_gguf(fused, tmp_path / "fused.gguf", "f32"))
    reference = {t.name: t for t in read_gguf(converted("qwen35moe", "f32")).tensors}
    assert [t.name for t in r.tensors] == list(reference)
    for t in r.tensors:
        np.testing.assert_array_equal(t.data, reference[t.name].data, err_msg=t.name)


@pytest.mark.parametrize("which", ["moe", "dense"])
def test_conditional_generation_converts_its_text_model(which, tmp_path):
    """Qwen3_5(Moe)ForConditionalGeneration: config.json's text_config, model.language_model.* as
    model.*, lm_head kept; the vision tower (model.visual.*) and the MTP head (mtp.*) skipped."""
    import transformers

    case = "qwen35moe" if which == "moe" else "qwen35"
    text = make_hf_config(case, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True}).to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=N_EMBD, patch_size=4,
                  num_position_embeddings=16)
    prefix = "Qwen3_5Moe" if which == "moe" else "Qwen3_5"
    config = getattr(transformers, prefix + "Config")(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = getattr(transformers, prefix + "ForConditionalGeneration")(config).to(torch.float32).eval()
    reinit_weights(model, 3)
    hf = tmp_path / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    save_tokenizer(hf)
    mtp = {"mtp.fc.weight": torch.zeros(N_EMBD, 2 * N_EMBD), "mtp.layers.0.input_layernorm.weight": torch.ones(N_EMBD)}
    safetensors.torch.save_file(mtp, hf / "model-mtp.safetensors", metadata={"format": "pt"})
    names = [n for p in hf.glob("*.safetensors") for n in safetensors.safe_open(p, "pt").keys()]
    assert any(n.startswith("model.visual.") for n in names) and any(n.startswith("mtp.") for n in names)

    r = read_gguf(convert_hf_to_gguf(hf, tmp_path / "m.gguf", "f32"))
    assert field(r, "general.architecture") == case
    text_config = json.loads((hf / "config.json").read_text())["text_config"]
    want_keys = expected_keys(case, text_config)
    assert want_keys["rope.dimension_sections"] == [2, 1, 1, 0]
    for key, value in want_keys.items():
        assert field(r, f"{case}.{key}") == pytest.approx(value), key
    assert field(r, f"{case}.nextn_predict_layers") is None

    text_only = tmp_path / "text"  # the checkpoint as a text model's: what the GGUF must hold
    text_only.mkdir()
    tensors = {n.replace("model.language_model.", "model."): v for n, v in hf_tensors(hf).items()
               if not n.startswith(("model.visual.", "mtp."))}
    safetensors.numpy.save_file(tensors, text_only / "model.safetensors")
    check_tensors(r, expected_tensors(case, text_config, text_only), "f32")


def test_recipe_keeps_the_small_tensors_in_f32(hf_model, tmp_path):
    """A quantized recipe leaves ssm_conv1d (llama.cpp: "do not quantize Mamba's small conv1d
    weights"), ssm_a, ssm_dt, the norms and the routers in F32."""
    r = read_gguf(convert_hf_to_gguf(hf_model("qwen35moe")[1], tmp_path / "q4.gguf", "q4_k_m"))
    types = {t.name: t.tensor_type for t in r.tensors}
    for name in ("ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ssm_norm.weight", "attn_norm.weight",
                 "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"):
        assert types["blk.0." + name] == QT.F32, name
    assert types["blk.0.ffn_gate_exps.weight"] not in (QT.F32, QT.F16)


# ------------------------------------------------------------------------------------------------
# unsupported configurations name the problem


def edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,message", [
    (dict(linear_value_head_dim=32), r"linear_key_head_dim \(16\) != linear_value_head_dim \(32\)"),
    (dict(linear_num_value_heads=3), r"linear_num_value_heads \(3\) must be a multiple of linear_num_key_heads"),
    (dict(layer_types=["linear_attention", "full_attention"]), r"layer_types has 2 entries, expected"),
    (dict(layer_types=["linear_attention"] * 3 + ["sliding_attention"]), r"unsupported layer_types \['sliding"),
])
def test_unsupported_configurations(changes, message, hf_model, tmp_path):
    hf = edit_config(hf_model("qwen3next")[1], tmp_path / "hf", **changes)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=message):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert list((tmp_path / "out").iterdir()) == []
