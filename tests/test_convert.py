"""weightstream.engine.tools.convert against independent references: gguf's own reader, name map and dequantizers,
the SmolLM2 GGUF that llama.cpp wrote (for the vocabulary), and the safetensors the tiny
transformers models were saved to (for every value)."""
from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from weightstream.engine.tools.convert import convert_hf_to_gguf  # noqa: E402
from tests.hf_models import CASES, GGUF_ARCH, cached_hf_model, make_hf_model, smollm2_gguf_path  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="SmolLM2 demo GGUF not available")

QT = gguf.GGMLQuantizationType
OUT_TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType
SEVEN = [c for c in CASES if c != "llama_tied"]
MATRIX = [(case, out_type) for out_type in ("f16", "f32", "bf16", "q8_0") for case in SEVEN] + [("llama_tied", "f16")]


# ------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """case -> directory of the tiny HF model (built on first use, once per session)."""
    return lambda case: cached_hf_model(case, tmp_path_factory)[1]


@pytest.fixture(scope="session")
def converted(request, hf_dir, tmp_path_factory):
    """(case, out_type) -> converted GGUF path. The conversions that the collected metadata and
    tensor tests will ask for are queued at once to a helper process, so that converting the next
    file overlaps with reading and checking this one (both take about a second, mostly in the
    vocabulary)."""
    root = tmp_path_factory.mktemp("gguf")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(exec, "import engine.convert, transformers.models.auto")  # warm up while the models are built
    jobs = {}

    def submit(case: str, out_type: str) -> None:
        if (case, out_type) not in jobs:
            path = root / f"{case}-{out_type}.gguf"
            jobs[case, out_type] = pool.submit(convert_hf_to_gguf, hf_dir(case), path, out_type)

    for item in request.session.items:
        if item.path == Path(__file__) and getattr(item, "originalname", None) in ("test_metadata", "test_tensors"):
            params = item.callspec.params
            submit(params["case"], params.get("out_type", "f16"))

    def get(case: str, out_type: str) -> Path:
        submit(case, out_type)
        return jobs[case, out_type].result()

    yield get
    pool.shutdown(cancel_futures=True)


class _NumpyWithoutMemmap:
    """numpy, except that memmap reads the whole file into an ordinary array."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def memmap(path, mode="r"):
        return np.fromfile(path, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def read_gguf(path: Path) -> "gguf.GGUFReader":
    """gguf.GGUFReader, unchanged, over an in-memory copy of the file: slicing a memmap costs
    microseconds per slice and the reader slices every token and merge, so a 49152-token
    vocabulary takes ~3 s through a memmap and ~1 s this way."""
    module = gguf.gguf_reader
    saved, module.np = module.np, _NumpyWithoutMemmap()
    try:
        return gguf.GGUFReader(path)
    finally:
        module.np = saved


def field(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def hf_tensors(hf: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, through safetensors + torch, as float32 NumPy."""
    out = {}
    for path in sorted(hf.glob("*.safetensors")):
        with safetensors.safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).float().numpy()
    return out


@functools.lru_cache(maxsize=None)
def expected_gguf_tensors(hf: Path, arch: str, n_layer: int) -> dict[str, np.ndarray]:
    """GGUF name -> expected NumPy array, naming through gguf-py's own TensorNameMap; per-expert
    matrices stacked on axis 0 in expert order."""
    tmap = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layer)
    experts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, value in hf_tensors(hf).items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts") + 1
            merged = ".".join(parts[:i] + parts[i + 1:])
            experts.setdefault(tmap.get_name(merged, try_suffixes=(".weight",)), {})[int(parts[i])] = value
            continue
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        out[gguf_name] = value
    for gguf_name, by_index in experts.items():
        out[gguf_name] = np.stack([by_index[e] for e in sorted(by_index)])
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head, interleaved rows (r0, r_h, r1, r_h+1, ...)
    back to halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_type(name: str, shape: tuple[int, ...], out_type: str):
    if len(shape) == 1 or name.endswith(("_norm.weight", ".bias")) or ".ffn_gate_inp" in name:
        return QT.F32
    if out_type == "q8_0" and shape[-1] % 32 != 0:
        return QT.F16
    return OUT_TYPES[out_type]


def check_values(name: str, got: np.ndarray, want: np.ndarray, qtype) -> None:
    if qtype == QT.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == QT.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    elif qtype == QT.BF16:
        bf16 = torch.from_numpy(np.ascontiguousarray(want)).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got, bf16, err_msg=name)
    elif qtype == QT.Q8_0:
        # per block of 32: |error| <= d/2 from rounding plus 127 * |d - f16(d)|, d = amax / 127
        blocks_got, blocks_want = got.reshape(-1, 32), want.reshape(-1, 32)
        step = np.abs(blocks_want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(blocks_got - blocks_want) <= 0.57 * step + 1e-12), name
        assert np.abs(got - want).max() > 0, name  # really quantized
    else:
        raise AssertionError(qtype)


def tokenizer_json(hf: Path) -> dict:
    return json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_vocab():
    """tokens, token types and merges of the demo GGUF, as llama.cpp's converter wrote them."""
    r = read_gguf(smollm2_gguf_path())
    return {k: field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges")}


# ------------------------------------------------------------------------------------------------
# metadata and vocabulary


@pytest.mark.parametrize("case", list(CASES))
def test_metadata(case, hf_dir, converted, smollm2_vocab):
    from weightstream.engine.formats.tokenizer import pre_name_for_hf_tokenizer

    hf = hf_dir(case)
    config = json.loads((hf / "config.json").read_text())
    r = read_gguf(converted(case, "f16"))
    arch = GGUF_ARCH[case]
    assert field(r, "general.architecture") == arch
    assert field(r, "general.type") == "model"
    assert field(r, "general.name")  # from the directory name, through gguf.Metadata as llama.cpp
    assert field(r, "general.size_label")
    assert field(r, "general.file_type") == FILE_TYPES["f16"]
    assert field(r, "general.quantization_version") == 2

    want = {
        "block_count": 2, "context_length": 256, "embedding_length": 64,
        "feed_forward_length": config["intermediate_size"], "attention.head_count": 4,
        "attention.head_count_kv": config["num_key_value_heads"], "attention.key_length": 16,
        "attention.value_length": 16,
    }
    for key, value in want.items():
        assert field(r, f"{arch}.{key}") == value, key
    assert field(r, f"{arch}.rope.freq_base") == 10000.0
    eps = 1e-5 if arch == "olmoe" else 1e-6  # OlmoeModel always writes 1e-5
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(eps, rel=1e-6)
    # LlamaModel alone writes vocab_size and rope.dimension_count (llama.cpp defaults n_rot to head_dim)
    assert field(r, f"{arch}.vocab_size") == (49152 if arch == "llama" else None)
    assert field(r, f"{arch}.rope.dimension_count") == (16 if arch == "llama" else None)
    assert field(r, f"{arch}.rope.scaling.type") is None

    n_expert = config.get("num_local_experts") or config.get("num_experts")
    assert field(r, f"{arch}.expert_count") == n_expert
    assert field(r, f"{arch}.expert_used_count") == (2 if n_expert else None)
    assert field(r, f"{arch}.expert_feed_forward_length") == (32 if arch in ("qwen2moe", "qwen3moe") else None)
    assert field(r, f"{arch}.expert_shared_feed_forward_length") == (64 if arch == "qwen2moe" else None)
    assert field(r, f"{arch}.expert_weights_norm") is None  # llama.cpp writes it for none of these

    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == pre_name_for_hf_tokenizer(tokenizer_json(hf))
    for key in ("tokens", "token_type", "merges"):
        assert field(r, f"tokenizer.ggml.{key}") == smollm2_vocab[key], key
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id"),
            field(r, "tokenizer.ggml.unknown_token_id"), field(r, "tokenizer.ggml.padding_token_id")) == (1, 2, 0, 2)
    # LlamaModel.set_vocab: add_bos_token=False for 49152-token vocabularies; nothing else sets it here
    assert field(r, "tokenizer.ggml.add_bos_token") == (False if arch == "llama" else None)
    assert field(r, "tokenizer.chat_template") == (hf / "chat_template.jinja").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# tensors: names, shapes, types, values


@pytest.mark.parametrize("case,out_type", MATRIX, ids=[f"{c}-{o}" for c, o in MATRIX])
def test_tensors(case, out_type, hf_dir, converted):
    hf = hf_dir(case)
    config = json.loads((hf / "config.json").read_text())
    arch = GGUF_ARCH[case]
    r = read_gguf(converted(case, out_type))
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == FILE_TYPES[out_type]

    want = expected_gguf_tensors(hf, arch, config["num_hidden_layers"])
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    assert ("output.weight" in got) == (not config["tie_word_embeddings"])
    if config.get("num_local_experts") or config.get("num_experts"):
        n_expert = config.get("num_local_experts") or config.get("num_experts")
        n_ff = config.get("moe_intermediate_size") or config["intermediate_size"]
        assert want["blk.0.ffn_gate_exps.weight"].shape == (n_expert, n_ff, 64)
        assert want["blk.0.ffn_down_exps.weight"].shape == (n_expert, 64, n_ff)
    if arch == "olmoe":  # q/k norms span the whole projection, not one head
        assert want["blk.0.attn_q_norm.weight"].shape == (64,)
        assert want["blk.0.attn_k_norm.weight"].shape == (16 * config["num_key_value_heads"],)
    if arch in ("qwen3", "qwen3moe"):
        assert want["blk.0.attn_q_norm.weight"].shape == (16,)

    for name, t in got.items():
        shape = want[name].shape
        assert list(t.shape) == list(reversed(shape)), name  # GGUF ne[] is NumPy's shape reversed
        assert t.tensor_type == expected_type(name, shape, out_type), name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n_head = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            assert not np.array_equal(values, unpermute(values, n_head))  # the rows really moved
            values = unpermute(values, n_head)
        check_values(name, values, want[name], t.tensor_type)


def test_permutation_pairs_rope_halves(hf_dir, converted):
    """After llama.cpp's permutation, HF's rotated pair (row i, row i + head_dim/2) of each head is
    the adjacent pair (2i, 2i+1) that rope NORM rotates."""
    hf = hf_tensors(hf_dir("llama"))["model.layers.0.self_attn.q_proj.weight"]
    r = read_gguf(converted("llama", "f32"))
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(hf.shape)
    for head in range(4):
        for i in range(8):
            np.testing.assert_array_equal(got[head * 16 + 2 * i], hf[head * 16 + i])
            np.testing.assert_array_equal(got[head * 16 + 2 * i + 1], hf[head * 16 + i + 8])


def test_olmoe_rms_eps_is_always_1e_5():
    """OlmoeModel.set_gguf_parameters writes 1e-5 whatever the config's rms_norm_eps."""
    from weightstream.engine.tools.convert import ARCHITECTURES, write_hparams

    w = gguf.GGUFWriter(None, "olmoe")
    hp = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, num_experts=8, num_experts_per_tok=2)
    write_hparams(w, ARCHITECTURES["OlmoeForCausalLM"], hp, gguf.LlamaFileType.MOSTLY_F16)
    assert w.kv_data[0]["olmoe.attention.layer_norm_rms_epsilon"].value == 1e-5
    assert w.kv_data[0]["olmoe.expert_count"].value == 8


def test_q8_0_falls_back_to_f16_for_short_rows_and_linear_rope(tmp_path):
    """A row length that is not a multiple of 32 cannot be Q8_0: llama.cpp writes F16 instead.
    (The same model checks linear rope scaling.)"""
    _, hf = make_hf_model("qwen2", tmp_path / "hf", intermediate_size=48,
                          rope_scaling={"rope_type": "linear", "factor": 4.0})
    r = read_gguf(convert_hf_to_gguf(hf, tmp_path / "out.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == QT.F16  # rows of 48
    assert types["blk.0.ffn_gate.weight"] == QT.Q8_0  # rows of 64
    assert field(r, "qwen2.rope.scaling.type") == "linear"
    assert field(r, "qwen2.rope.scaling.factor") == 4.0


def test_bf16_checkpoint_and_shards(tmp_path):
    """bf16 safetensors, split into shards with an index, convert to exactly the bf16 values."""
    model, hf = make_hf_model("mixtral", tmp_path / "one" / "m")
    sharded = tmp_path / "two" / "m"
    model.to(torch.bfloat16).save_pretrained(sharded, safe_serialization=True, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(hf / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    r = read_gguf(convert_hf_to_gguf(sharded, tmp_path / "bf16.gguf", "f32", progress=True))
    want = expected_gguf_tensors(sharded, "llama", 2)
    for t in r.tensors:
        assert t.tensor_type == QT.F32
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want[t.name].shape)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            values = unpermute(values, 4 if "attn_q" in t.name else 2)
        np.testing.assert_array_equal(values, want[t.name], err_msg=t.name)


def test_llama3_rope_and_unsupported_rope(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    _, hf = make_hf_model("llama", tmp_path / "llama3", rope_scaling=rope, rope_theta=500000.0)
    r = read_gguf(convert_hf_to_gguf(hf, tmp_path / "llama3.gguf", "f16"))
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert t.tensor_type == QT.F32 and list(t.shape) == [8]
    # Llama 3.1's frequency-dependent divisors, computed here in float64
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 16, 2) / 16)
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    want = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    np.testing.assert_allclose(t.data, want, rtol=1e-5)
    assert field(r, "llama.rope.scaling.type") is None

    _, hf = make_hf_model("qwen3", tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope scaling 'dynamic'"):
        convert_hf_to_gguf(hf, tmp_path / "dynamic.gguf")
    assert not list(tmp_path.glob("dynamic.gguf*")) and not list(tmp_path.glob(".dynamic.gguf*"))


# ------------------------------------------------------------------------------------------------
# errors leave nothing behind


def copy_model(hf: Path, dst: Path) -> Path:
    shutil.copytree(hf, dst)
    return dst


def rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def assert_empty(directory: Path) -> None:
    assert list(directory.iterdir()) == []


def test_unsupported_architecture(hf_dir, tmp_path):
    hf = copy_model(hf_dir("llama"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_missing_tensor(hf_dir, tmp_path):
    hf = copy_model(hf_dir("qwen2moe"), tmp_path / "hf")
    rewrite_safetensors(hf / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_unexpected_tensor(hf_dir, tmp_path):
    hf = copy_model(hf_dir("qwen3"), tmp_path / "hf")
    rewrite_safetensors(hf / "model.safetensors",
                        lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_wrong_shape(hf_dir, tmp_path):
    hf = copy_model(hf_dir("qwen2"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 96
    (hf / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    shape_error = r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\], expected \[96, 64\]"
    with pytest.raises(ValueError, match=shape_error):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_unsupported_dtype(hf_dir, tmp_path):
    hf = copy_model(hf_dir("qwen3"), tmp_path / "hf")
    rewrite_safetensors(hf / "model.safetensors",
                        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].double()}))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="model.norm.weight: unsupported safetensors dtype F64"):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_truncated_checkpoint(hf_dir, tmp_path):
    hf = copy_model(hf_dir("qwen3"), tmp_path / "hf")
    with open(hf / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        convert_hf_to_gguf(hf, tmp_path / "out" / "m.gguf")
    assert_empty(tmp_path / "out")


def test_failure_while_writing_removes_the_partial_file(hf_dir, tmp_path, monkeypatch):
    """A read error after the header is on disk fails the conversion; the temporary file goes."""
    from weightstream.engine.tools import convert

    load, partial = convert.SafetensorsIndex.load, []

    def failing_load(self, name):
        if name == "model.norm.weight":  # output_norm: late in the file
            partial.extend(p.stat().st_size for p in tmp_path.glob(".m.gguf.*.tmp"))
            raise OSError("disk read error")
        return load(self, name)

    monkeypatch.setattr(convert.SafetensorsIndex, "load", failing_load)
    with pytest.raises(OSError, match="disk read error"):
        convert_hf_to_gguf(hf_dir("qwen3"), tmp_path / "m.gguf")
    assert len(partial) == 1 and partial[0] > 0  # the header and earlier tensors were on disk
    assert_empty(tmp_path)


def test_output_directory_missing(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_hf_to_gguf(hf_dir("llama"), tmp_path / "nowhere" / "m.gguf")
    assert not (tmp_path / "nowhere").exists()


def test_bad_arguments(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="out_type must be one of"):
        convert_hf_to_gguf(hf_dir("llama"), tmp_path / "m.gguf", out_type="q4_0")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_hf_to_gguf(tmp_path, tmp_path / "m.gguf")
    assert_empty(tmp_path)
