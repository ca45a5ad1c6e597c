"""Model-level quantization: recipes (engine/tools/recipes.py), requantizing a GGUF (engine/tools/quantize.py),
`convert --type q2_k`, and importance matrices (engine/tools/imatrix.py), against independent references:
gguf's own reader and dequantizers, the F32 file's logits, and activation statistics recomputed here
in NumPy from the file's weights."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine.tools import imatrix as im  # noqa: E402
from weightstream.engine.runtime.engine import Engine  # noqa: E402
from weightstream.engine.tools.convert import convert_hf_to_gguf  # noqa: E402
from weightstream.engine.tools.quantize import quantize_array, quantize_gguf  # noqa: E402
from tests.hf_models import cached_hf_model, make_hf_model, smollm2_gguf_path  # noqa: E402
from tests.tiny_gguf import rewritten_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="SmolLM2 demo GGUF not available")

QT = gguf.GGMLQuantizationType
MOE = ["qwen2moe", "qwen3moe", "olmoe", "mixtral"]
# Rows 256 wide (k-quant blocks fit) for every matrix: hidden 256 = 4 heads of 64, FFN widths 256.
WIDE = {
    "qwen2moe": dict(moe_intermediate_size=256, shared_expert_intermediate_size=256),
    "qwen3moe": dict(moe_intermediate_size=256),
    "olmoe": dict(intermediate_size=256),
    "mixtral": dict(intermediate_size=256),
}
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905 Einstein published four papers; "
        "def f(x): return x * 2  # a comment\n") * 3


_wide: dict[str, Path] = {}


def wide_model(arch, tmp_path_factory) -> Path:
    """The case's model at hidden 256, its matrices' spread halved (hf_models' N(0, 0.15) is chosen
    for rows of 64: at 256 each matrix would amplify 2.4x and the model would be chaotic), saved again."""
    if arch not in _wide:
        import torch

        model, d = make_hf_model(arch, tmp_path_factory.mktemp(f"wide-{arch}"), seed=3, hidden_size=256,
                                 head_dim=64, **WIDE[arch])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight", "gate.weight")):
                    p.mul_(0.5)
        model.save_pretrained(d, safe_serialization=True)
        _wide[arch] = d
    return _wide[arch]


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    """arch -> the wide random-init model converted to F32 (built once per module)."""
    root, made = tmp_path_factory.mktemp("f32"), {}

    def get(arch):
        if arch not in made:
            made[arch] = convert_hf_to_gguf(wide_model(arch, tmp_path_factory), root / f"{arch}.gguf", "f32")
        return made[arch]
    return get


def read(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def nmse(got, want):
    return float(np.mean((got - want) ** 2) / np.mean(want ** 2))


# ------------------------------------------------------------------------------------------------
# recipes: types per tensor, read back by gguf


def q2_k_expected(name: str, n_layer: int = 2) -> QT:
    """llama.cpp's Q2_K mix for these shapes, written out by hand: 2 kv heads of 4 (GQA 2 < 4), rows
    256 wide, untied output; experts stay Q2_K (our one deviation, see engine/tools/recipes.py)."""
    if name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
        return QT.F32
    if name == "output.weight":
        return QT.Q6_K
    if name.endswith(("attn_v.weight", "attn_output.weight", "ffn_down_shexp.weight")):
        return QT.Q3_K
    return QT.Q2_K  # token_embd (untied), attn_q, attn_k, experts, shared gate/up


def test_convert_q2_k_reads_back_through_gguf(tmp_path_factory, tmp_path, f32_file):
    """`convert --type q2_k` writes the recipe's type for each tensor, the F32 file's shapes, and values
    that gguf's dequantizer reads back close to the F32 file's; `quantize` of the F32 file gives the
    same types."""
    hf = wide_model("qwen2moe", tmp_path_factory)
    out = convert_hf_to_gguf(hf, tmp_path / "q2_k.gguf", "q2_k")
    r, got = read(out)
    _, ref = read(f32_file("qwen2moe"))
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q2_K)
    assert field(r, "weightstream.quantize.recipe") == "q2_k"
    assert field(r, "tokenizer.ggml.tokens") == field(read(f32_file("qwen2moe"))[0], "tokenizer.ggml.tokens")
    assert sorted(got) == sorted(ref)
    seen = set()
    for name, t in got.items():
        assert t.tensor_type == q2_k_expected(name), name
        assert list(t.shape) == list(ref[name].shape), name
        seen.add(t.tensor_type)
        want = np.asarray(ref[name].data, dtype=np.float32)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if t.tensor_type == QT.F32:
            np.testing.assert_array_equal(values, want)
        else:  # 2.6-6.6 bits per weight on Gaussian weights
            assert 0 < nmse(values, want) < {QT.Q2_K: 0.15, QT.Q3_K: 0.06, QT.Q6_K: 0.003}[t.tensor_type], name
    assert seen == {QT.F32, QT.Q2_K, QT.Q3_K, QT.Q6_K}
    _, requant = read(quantize_gguf(f32_file("qwen2moe"), tmp_path / "requant.gguf", "q2_k", progress=False))
    assert {n: t.tensor_type for n, t in requant.items()} == {n: t.tensor_type for n, t in got.items()}


def test_recipe_rules_llama_cpp():
    """A few of llama.cpp's rules on shapes the tiny models do not have: 576-wide rows fall back to
    Q4_0 (SmolLM2), a tied output takes Q8_0 when Q6_K does not fit, 8-expert models keep attn_v /
    attn_k in Q8_0, q4_k_m's use_more_bits layers."""
    from weightstream.engine.tools.recipes import ModelShape, tensor_types, use_more_bits

    smol = ModelShape(n_layer=30, n_head=9, n_head_kv=3, arch="llama")
    t = tensor_types("q2_k", [("token_embd.weight", (49152, 576)), ("blk.0.attn_v.weight", (192, 576)),
                              ("blk.0.ffn_down.weight", (576, 1536)), ("blk.0.ffn_up.weight", (1536, 576)),
                              ("blk.0.attn_norm.weight", (576,))], smol)
    assert t == {"token_embd.weight": QT.Q8_0, "blk.0.attn_v.weight": QT.Q4_0, "blk.0.ffn_down.weight": QT.Q3_K,
                 "blk.0.ffn_up.weight": QT.Q4_0, "blk.0.attn_norm.weight": QT.F32}
    mixtral = ModelShape(n_layer=32, n_expert=8, n_head=32, n_head_kv=8, arch="llama")
    t = tensor_types("q2_k", [("blk.3.attn_v.weight", (1024, 4096)), ("blk.3.attn_k.weight", (1024, 4096)),
                              ("blk.3.attn_output.weight", (4096, 4096)), ("output.weight", (32000, 4096)),
                              ("blk.3.ffn_down_exps.weight", (8, 4096, 14336))], mixtral)
    assert t == {"blk.3.attn_v.weight": QT.Q8_0, "blk.3.attn_k.weight": QT.Q8_0,
                 "blk.3.attn_output.weight": QT.Q5_K, "output.weight": QT.Q6_K,
                 "blk.3.ffn_down_exps.weight": QT.Q2_K}
    dense = ModelShape(n_layer=32, n_head=32, n_head_kv=8, arch="llama")
    names = [(f"blk.{i}.ffn_down.weight", (4096, 14336)) for i in range(32)]
    t = tensor_types("q4_k_m", names, dense)
    more = [i for i in range(32) if t[f"blk.{i}.ffn_down.weight"] == QT.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert more == [i for i in range(32) if use_more_bits(i, 32)]
    assert tensor_types("q2_k", [("blk.0.attn_v.weight", (4096, 4096))], dense)["blk.0.attn_v.weight"] == QT.Q4_K


# ------------------------------------------------------------------------------------------------
# quantized MoE models run in the engine


# Logits NMSE (all positions of TEXT), measured 2026-12-02 on these random-init models:
# - against the same weights expanded to F32 by gguf's dequantizer (the file computes what its blocks
#   say; only the kernels' int8 rounding of activations differs): 3.5e-4 .. 4.2e-3 -> bound 2e-2;
# - against the F32 original: 0.25 .. 0.36 -> bound 0.5. Random models amplify any weight error
#   (no trained structure; routing flips): Q4_K's weight NMSE is 5e-3, and even Q8_0 (weight NMSE
#   2.5e-5) gives 2.8e-3 on the hidden-64 qwen2moe.
DEQUANTIZED_NMSE = 2e-2
F32_NMSE = 0.5


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The GGUF at src with every tensor expanded to F32 by gguf's own dequantizer."""
    return rewritten_gguf(src, dst)


def logits_of(path: Path, ids) -> np.ndarray:
    with Engine.load(path, threads=1) as e:
        return e.logits(ids)


@pytest.mark.parametrize("arch", MOE)
def test_q4_k_m_moe_runs_in_the_engine(arch, f32_file, tmp_path):
    out = quantize_gguf(f32_file(arch), tmp_path / "q4_k_m.gguf", "q4_k_m", progress=False)
    _, got = read(out)
    assert got["blk.0.ffn_gate_exps.weight"].tensor_type == QT.Q4_K
    with Engine.load(f32_file(arch)) as e:
        ids = e.tokenizer.encode(TEXT)
    logits = logits_of(out, ids)
    vs_dequantized = nmse(logits, logits_of(dequantized_copy(out, tmp_path / "deq.gguf"), ids))
    vs_f32 = nmse(logits, logits_of(f32_file(arch), ids))
    print(f"{arch}: q4_k_m logits NMSE {vs_dequantized:.2e} vs its dequantized weights, {vs_f32:.2e} vs F32")
    assert 0 < vs_dequantized < DEQUANTIZED_NMSE
    assert 0 < vs_f32 < F32_NMSE


def test_same_type_is_copied_byte_for_byte(f32_file, tmp_path):
    """llama.cpp's rule: a tensor already in its target type is copied, not requantized."""
    q8 = quantize_gguf(f32_file("qwen3moe"), tmp_path / "q8.gguf", "q8_0", progress=False)
    again = quantize_gguf(q8, tmp_path / "q8-again.gguf", "q8_0", progress=False)
    _, a = read(q8)
    _, b = read(again)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


# ------------------------------------------------------------------------------------------------
# importance matrices


def test_imatrix_file_round_trip_and_llama_cpp_layout(tmp_path):
    c = im.Collector({"blk.0.ffn_down_exps.weight": 3})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    c.add("blk.0.attn_q.weight", x)
    c.add("blk.0.ffn_down_exps.weight", x[:5], expert=0)
    c.add("blk.0.ffn_down_exps.weight", x[5:25], expert=2)  # expert 1 never routed to
    path = im.save_imatrix(tmp_path / "imatrix.dat", c, chunk_size=16, chunks=2, dataset="calib.txt")
    data = im.read_imatrix(path)
    assert (data.dataset, data.chunks) == ("calib.txt", 2)
    np.testing.assert_allclose(data.values["blk.0.attn_q.weight"], np.mean(x * x, axis=0), rtol=1e-6)
    exps = data.values["blk.0.ffn_down_exps.weight"].reshape(3, 8)
    np.testing.assert_allclose(exps[0], np.mean(x[:5] ** 2, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(exps[1], 1.0)  # llama.cpp stores 1 for an expert with no data
    np.testing.assert_allclose(exps[2], np.mean(x[5:25] ** 2, axis=0), rtol=1e-6)

    # the bytes, as llama.cpp's save_imatrix_legacy lays them out: entries sorted by name,
    # ncall = ceil(max count / chunk size), values = mean x^2 * ncall
    raw = path.read_bytes()
    assert struct.unpack_from("<i", raw, 0) == (2,)
    n = struct.unpack_from("<i", raw, 4)[0]
    assert raw[8:8 + n] == b"blk.0.attn_q.weight"
    ncall, nval = struct.unpack_from("<ii", raw, 8 + n)
    assert (ncall, nval) == (3, 8)  # ceil(40 / 16)
    stored = np.frombuffer(raw, "<f4", 8, 16 + n)
    np.testing.assert_allclose(stored, np.mean(x * x, axis=0) * 3, rtol=1e-6)
    assert raw.endswith(struct.pack("<ii", 2, 9) + b"calib.txt")


def test_reads_llama_cpp_gguf_imatrix(tmp_path):
    """llama-imatrix's newer default: NAME.in_sum2 [n_mat, cols] and NAME.counts [n_mat] tensors."""
    w = gguf.GGUFWriter(tmp_path / "imatrix.gguf", "")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["wiki.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.arange(12, dtype=np.float32).reshape(3, 4)
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2.0], [0.0], [4.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = im.read_imatrix(tmp_path / "imatrix.gguf")
    assert (data.dataset, data.chunks) == ("wiki.txt", 7)
    np.testing.assert_array_equal(data.values["blk.0.ffn_up_exps.weight"],
                                  np.concatenate([sums[0] / 2, np.ones(4), sums[2] / 4]).astype(np.float32))


def test_bad_imatrix_file(tmp_path):
    (tmp_path / "bad.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="not an imatrix"):
        im.read_imatrix(tmp_path / "bad.dat")
    with pytest.raises(FileNotFoundError, match="imatrix file not found"):
        im.read_imatrix(tmp_path / "missing.dat")


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    """The small qwen2moe of tests/hf_models (hidden 64, 4 experts top-2, shared expert) in F32."""
    hf = cached_hf_model("qwen2moe", tmp_path_factory, seed=2)[1]
    return convert_hf_to_gguf(hf, tmp_path_factory.mktemp("small") / "qwen2moe.gguf", "f32")


def collect(path, **load):
    with Engine.load(path, threads=1, n_ctx=64, **load) as engine:
        c, n = im.collect_imatrix(engine, TEXT, n_ctx=32)
        ids = engine.tokenizer.encode(TEXT, add_special=True, parse_special=False)
    return c, n, ids


def test_imatrix_collected_on_a_moe(small_moe):
    """One entry per matrix with the right length, positive values, expert counts that add up to
    top-k per token, and layer 0's attention input recomputed here from the file's weights."""
    c, n_chunks, ids = collect(small_moe)
    values, _ = c.result(32)
    names = [f"blk.{i}.{m}.weight" for i in range(2) for m in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
              "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")]
    assert sorted(values) == sorted(names)
    cols = {"attn_q": 64, "attn_k": 64, "attn_v": 64, "attn_output": 64, "ffn_gate_inp": 64,
            "ffn_gate_exps": 4 * 64, "ffn_up_exps": 4 * 64, "ffn_down_exps": 4 * 32,
            "ffn_gate_shexp": 64, "ffn_up_shexp": 64, "ffn_down_shexp": 64}
    for name, v in values.items():
        assert v.shape == (cols[name.split(".")[2]],), name
        assert np.all(v > 0) and np.all(np.isfinite(v)), name
    tokens = n_chunks * 32
    assert c.stats["blk.0.attn_q.weight"].counts.tolist() == [tokens]
    assert c.stats["blk.0.ffn_gate_exps.weight"].counts.sum() == 2 * tokens  # top-2
    assert np.array_equal(c.stats["blk.0.ffn_down_exps.weight"].counts, c.stats["blk.0.ffn_gate_exps.weight"].counts)

    # layer 0's q/k/v input is rmsnorm(embedding) * attn_norm: recomputed from the file
    _, t = read(small_moe)
    embd = np.asarray(t["token_embd.weight"].data, dtype=np.float32)
    norm = np.asarray(t["blk.0.attn_norm.weight"].data, dtype=np.float32)
    chunk = np.array(ids[:tokens]).reshape(n_chunks, 32)
    x = embd[chunk.reshape(-1)].astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6) * norm
    np.testing.assert_allclose(values["blk.0.attn_q.weight"], np.mean(h * h, axis=0), rtol=1e-4)


def test_imatrix_when_experts_stream(small_moe):
    """Collected with the experts read from disk into a small cache: the same statistics."""
    resident, _, _ = collect(small_moe)
    streamed, _, _ = collect(small_moe, stream="experts", cache_slots=3)
    assert sorted(streamed.stats) == sorted(resident.stats)
    for name, st in resident.stats.items():
        np.testing.assert_array_equal(streamed.stats[name].counts, st.counts, err_msg=name)
        np.testing.assert_allclose(streamed.stats[name].sums, st.sums, rtol=1e-5, err_msg=name)


def test_quantize_with_imatrix_records_it(small_moe, tmp_path):
    c, n, _ = collect(small_moe)
    path = im.save_imatrix(tmp_path / "imatrix.dat", c, 32, n, dataset="calibration.txt")
    out = quantize_gguf(small_moe, tmp_path / "q.gguf", "q4_k_m", imatrix=path, progress=False)
    plain = quantize_gguf(small_moe, tmp_path / "plain.gguf", "q4_k_m", progress=False)
    r, got = read(out)
    assert field(r, "quantize.imatrix.file") == str(path)
    assert field(r, "quantize.imatrix.dataset") == "calibration.txt"
    assert field(r, "quantize.imatrix.entries_count") == len(c.stats)
    assert field(r, "quantize.imatrix.chunks_count") == n
    _, other = read(plain)
    name = "blk.0.ffn_down_exps.weight"  # the weights changed: the imatrix was used, per expert
    assert not np.array_equal(np.asarray(got[name].data), np.asarray(other[name].data))


def test_expert_tensor_uses_each_experts_imatrix():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 8, 64)).astype(np.float32)
    weights = rng.uniform(0.1, 10, (3, 64)).astype(np.float32)
    got = quantize_array(w, QT.Q4_0, weights.reshape(-1))
    from weightstream.kernels.quantize_weights import quantize

    for e in range(3):
        np.testing.assert_array_equal(got[e], quantize(w[e], QT.Q4_0, weights[e]))
    with pytest.raises(ValueError, match="imatrix entry for x has 10 values"):
        quantize_array(w, QT.Q4_0, np.ones(10, np.float32), "x")


# ------------------------------------------------------------------------------------------------
# failures


def test_failing_write_leaves_no_file(small_moe, tmp_path, monkeypatch):
    from weightstream.engine.tools import quantize as quantize_model

    real, calls = quantize_model.quantize_rows, []

    def failing(w, qtype, imatrix=None):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(w, qtype, imatrix)

    monkeypatch.setattr(quantize_model, "quantize_rows", failing)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OSError, match="disk full"):
        quantize_gguf(small_moe, out_dir / "q.gguf", "q2_k", progress=False)
    assert list(out_dir.iterdir()) == []


def test_unsupported_ftype(small_moe, tmp_path, capsys):
    from weightstream.engine.cli.main import main

    with pytest.raises(ValueError, match="unknown quantization type 'q1_x'; supported: q2_k, q3_k_m, q4_k_m, q8_0"):
        quantize_gguf(small_moe, tmp_path / "q.gguf", "q1_x", progress=False)
    assert main(["quantize", str(small_moe), str(tmp_path / "q.gguf"), "iq2_xxs"]) == 1
    assert "unknown quantization type 'iq2_xxs'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="imatrix entry blk.0.attn_q.weight has 3 values"):
        quantize_gguf(small_moe, tmp_path / "q.gguf", "q2_k", imatrix={"blk.0.attn_q.weight": np.ones(3)},
                      progress=False)
    assert list(tmp_path.iterdir()) == []
