"""Hugging Face safetensors -> GGUF v3, written the way llama.cpp's convert_hf_to_gguf.py writes it.

Seven Hugging Face architectures map onto six llama.cpp architectures (ARCHITECTURES below). The
facts come from llama.cpp (conversion/{base,llama,qwen,olmo}.py, formerly one convert_hf_to_gguf.py,
and gguf-py's constants / tensor_mapping); the code is ours. What we follow:

- tensor names (`token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_exps`, ...) and shapes: per-expert HF
  matrices are stacked into one 3-D tensor per layer, NumPy shape [n_expert, n_ff, n_embd] for
  gate/up and [n_expert, n_embd, n_ff] for down;
- the `llama` architecture's Q/K row permutation (LlamaModel.permute): llama.cpp rotates adjacent
  pairs (rope NORM) where Hugging Face rotates halves, so the rows of each head are interleaved;
- tensor types (ModelBase.prepare_tensors): 1-D tensors, `*_norm.weight`, biases and the MoE routers
  (`ffn_gate_inp`, `ffn_gate_inp_shexp`) stay F32; the rest takes `out_type`; rows that Q8_0 cannot
  hold (length not a multiple of 32) fall back to F16;
- metadata keys and the order llama.cpp writes them in: general.* (via gguf.Metadata, as
  llama.cpp does), hyperparameters (TextModel.set_gguf_parameters plus the per-architecture
  extras), general.quantization_version, then the tokenizer (TextModel._set_vocab_gpt2; the
  tokenizer.ggml.pre name comes from weightstream.engine.formats.tokenizer, merges and special tokens from gguf's
  SpecialVocab as in llama.cpp).

One deliberate difference: tensors are written in a fixed order (token_embd, then block by block,
then output_norm and output) rather than in the checkpoint's order; GGUF readers look tensors up by
name, so nothing depends on it.

Tensors are read one at a time (experts: one layer's worth at a time) and streamed into the file:
the header, with every tensor's name, shape and type, is planned from the checkpoint index before
any data is read. The file is written under a temporary name beside `out_path` and renamed into
place when complete, so a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from . import recipes
from .imatrix import read_imatrix
from .quantize import quantize_array, write_recipe_keys
from ..formats.atomic import gguf_output
from ..formats.tokenizer import pre_name_for_hf_tokenizer

# out_type -> (general.file_type, the type 2-D weights get)
OUT_TYPES: dict[str, tuple[LlamaFileType, QT]] = {
    "f32": (LlamaFileType.ALL_F32, QT.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps onto a llama.cpp architecture."""

    arch: str  # llama.cpp architecture (general.architecture)
    permute_qk: bool = False  # reorder Q/K rows for rope NORM (llama.cpp: LlamaModel.undo_permute)
    qkv_bias: bool = False  # attn_{q,k,v}.bias (Qwen2Model / Qwen2MoeModel checkpoints)
    qk_norm: str | None = None  # "head": q_norm/k_norm are [head_dim] (qwen3); "full": [n_head * head_dim] (olmoe)
    moe: str | None = None  # HF name of the sparse MoE block in a layer ("block_sparse_moe" or "mlp")
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # HF names of gate, up, down
    expert_ff_key: str = "intermediate_size"  # config key of one routed expert's FFN width
    shared_expert: bool = False  # qwen2moe: mlp.shared_expert.* and the sigmoid gate mlp.shared_expert_gate
    llama_extras: bool = False  # LlamaModel: vocab_size, rope.dimension_count, add_space_prefix, llama3 rope
    moe_ff_keys: bool = False  # Qwen2MoeModel: expert_feed_forward_length (+ shared), from the config
    rms_eps: float | None = None  # OlmoeModel overrides the config's rms_norm_eps with 1e-5


ARCHITECTURES: dict[str, ArchSpec] = {
    # conversion/llama.py: LlamaModel (LlamaForCausalLM and MixtralForCausalLM both become `llama`)
    "LlamaForCausalLM": ArchSpec("llama", permute_qk=True, llama_extras=True),
    "MixtralForCausalLM": ArchSpec("llama", permute_qk=True, llama_extras=True, moe="block_sparse_moe",
                                   expert_proj=("w1", "w3", "w2")),
    # conversion/qwen.py: Qwen2Model, Qwen3Model(Qwen2Model), Qwen2MoeModel, Qwen3MoeModel(Qwen2MoeModel)
    "Qwen2ForCausalLM": ArchSpec("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qk_norm="head"),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", qkv_bias=True, moe="mlp", expert_ff_key="moe_intermediate_size",
                                    shared_expert=True, moe_ff_keys=True),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", qk_norm="head", moe="mlp", expert_ff_key="moe_intermediate_size",
                                    moe_ff_keys=True),
    # conversion/olmo.py: OlmoeModel
    "OlmoeForCausalLM": ArchSpec("olmoe", qk_norm="full", moe="mlp", rms_eps=1e-5),
}

# Per-layer HF name (after "model.layers.N.") -> GGUF name (after "blk.N."), as gguf-py's tensor_mapping.
ATTENTION = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}
QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
FFN_NORM = {"post_attention_layernorm.weight": "ffn_norm.weight"}
DENSE_FFN = {"mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
SHARED_EXPERT = {
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}
EXPERT_GGUF = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")

# Checkpoint entries llama.cpp skips (ModelBase.prepare_tensors: "we don't need these").
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

# Tensors llama.cpp always keeps in F32 (besides 1-D tensors, *_norm.weight and non-.weight tensors):
# the MoE routers.
ALWAYS_F32 = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def convert_hf_to_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, out_type: str = "f16",
                       progress: bool = False, imatrix: str | os.PathLike | dict | None = None) -> Path:
    """Convert the Hugging Face checkpoint in `hf_dir` (config.json, model*.safetensors,
    tokenizer.json) into one GGUF file at `out_path`, as llama.cpp's converter would. Returns the
    path written. Raises ValueError for an unsupported architecture, configuration or tokenizer and
    for missing, unexpected or misshapen tensors; FileNotFoundError for missing inputs or a missing
    output directory. out_type may also be a recipe of engine/tools/recipes.py (q2_k, q3_k_m, q4_k_m):
    each tensor then gets the recipe's type, quantized as engine/tools/quantize.py does (with the
    importance matrix `imatrix`, a file or a dict, if given)."""

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    recipe = recipes.RECIPES.get(out_type) if out_type not in OUT_TYPES else None
    if out_type not in OUT_TYPES and recipe is None:
        raise ValueError(f"out_type must be one of {sorted(OUT_TYPES) + sorted(recipes.RECIPES)}, got {out_type!r}")
    if imatrix is not None and recipe is None:
        raise ValueError(f"an importance matrix needs a quantized recipe ({', '.join(recipes.RECIPES)}), not {out_type!r}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_path.parent} does not exist")

    hparams = load_hparams(hf_dir)
    hf_arch = (hparams.get("architectures") or ["<none>"])[0]
    spec = ARCHITECTURES.get(hf_arch)
    if spec is None:
        raise ValueError(f"{hf_dir}: unsupported architecture {hf_arch!r}; supported: {', '.join(ARCHITECTURES)}")
    ftype, weight_type = OUT_TYPES[out_type] if recipe is None else (recipe.file_type, QT.F32)

    checkpoint = SafetensorsIndex(hf_dir)
    plan = plan_tensors(spec, hparams, checkpoint, weight_type)
    im_info = im_values = None
    if recipe is not None:  # the recipe's type for each tensor, quantized with weightstream.engine.tools.quantize
        d = Dims.from_hparams(spec, hparams)
        types = recipes.tensor_types(recipe, [(t.name, t.shape) for t in plan],
                                     recipes.ModelShape(d.n_layer, d.n_expert, d.n_head, d.n_head_kv, spec.arch))
        plan = [dataclasses.replace(t, qtype=types[t.name]) for t in plan]
        im_info = read_imatrix(imatrix) if isinstance(imatrix, (str, os.PathLike)) else None
        im_values = im_info.values if im_info is not None else imatrix

    with gguf_output(out_path, spec.arch) as (writer, tmp_path):
        for t in plan:  # header first: names, shapes and types are known before any data is read
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        write_metadata(writer, spec, hparams, hf_dir, ftype)
        if recipe is not None:
            write_recipe_keys(writer, recipe, imatrix, im_info, im_values)
        writer.write_header_to_file(tmp_path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc=f"{out_path.name}")
        for t in plan:
            if recipe is None:
                data = gguf.quants.quantize(t.load(checkpoint), t.qtype)
            else:
                data = quantize_array(t.load(checkpoint), t.qtype, (im_values or {}).get(t.name), t.name)
            writer.write_tensor_data(data)
            if bar is not None:
                bar.update(t.nbytes)
        if bar is not None:
            bar.close()
    return out_path


# ----------------------------------------------------------------------------------------------
# checkpoint reading


def load_hparams(hf_dir: Path) -> dict[str, Any]:
    """config.json as llama.cpp reads it: through transformers' AutoConfig when it knows the model
    (so class defaults for keys missing from the file are filled in), else the raw file."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(hf_dir, trust_remote_code=False).to_dict()
    except Exception:  # transformers missing, or a model type it does not know
        with open(hf_dir / "config.json", encoding="utf-8") as f:
            return json.load(f)


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `path`
    nbytes: int


class SafetensorsIndex:
    """Every tensor of a (possibly sharded) safetensors checkpoint: name -> file, dtype, shape and
    byte range, read from the headers only. `load` reads one tensor from disk.

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the data; we read it directly because the
    safetensors NumPy loader cannot represent bf16."""

    def __init__(self, hf_dir: Path):
        index_file = hf_dir / "model.safetensors.index.json"
        if index_file.is_file():
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no 'weight_map'")
            parts = sorted(set(weight_map.values()))
        else:
            weight_map = None
            parts = sorted(p.name for p in hf_dir.glob("model*.safetensors"))
        if not parts:
            raise FileNotFoundError(f"{hf_dir}: no model*.safetensors files")
        self.entries: dict[str, _Entry] = {}
        for part in parts:
            path = hf_dir / part
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index_file.name} but missing")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            size = path.stat().st_size
            for name, e in header.items():
                begin, end = e["data_offsets"]
                if 8 + n + end > size:
                    raise ValueError(f"{path}: truncated ({name} ends at byte {8 + n + end}, the file has {size})")
                self.entries[name] = _Entry(path, e["dtype"], tuple(e["shape"]), 8 + n + begin, end - begin)
        if weight_map is not None and set(weight_map) != set(self.entries):
            missing = sorted(set(weight_map) - set(self.entries))
            extra = sorted(set(self.entries) - set(weight_map))
            raise ValueError(f"{index_file}: weight map and shards disagree; missing {missing[:5]}, extra {extra[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def check_dtype(self, name: str) -> None:
        if self.entries[name].dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {self.entries[name].dtype} "
                             f"(supported: {', '.join(_ST_DTYPES)})")

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 or float16: llama.cpp keeps f16/f32 as they are and widens the rest
        (bf16) to f32 before choosing the output type."""
        self.check_dtype(name)
        e = self.entries[name]
        dtype = np.dtype(_ST_DTYPES[e.dtype])
        count = int(np.prod(e.shape, dtype=np.int64))
        if count * dtype.itemsize != e.nbytes:
            raise ValueError(f"{e.path.name}: {name} has {e.nbytes} bytes, not the {count * dtype.itemsize} "
                             f"of {e.dtype} {list(e.shape)}")
        data = np.fromfile(e.path, dtype=dtype, count=count, offset=e.offset)
        if data.size != count:
            raise ValueError(f"{e.path}: truncated inside {name}")
        data = data.reshape(e.shape)
        if e.dtype == "BF16":  # bf16 is the top half of an f32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data


# ----------------------------------------------------------------------------------------------
# tensor plan


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # NumPy order (GGUF's ne[] is the reverse)
    qtype: QT
    sources: list[str]  # HF names
    stack: bool = False  # stack the sources on a new axis 0 (experts)
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    generate: Callable[[], np.ndarray] | None = None  # tensors llama.cpp computes (rope_freqs)
    nbytes: int = field(init=False)

    def __post_init__(self):
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        self.nbytes = int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * type_size

    def load(self, checkpoint: SafetensorsIndex) -> np.ndarray:
        if self.generate is not None:
            return self.generate()
        data = np.stack([checkpoint.load(s) for s in self.sources]) if self.stack else checkpoint.load(self.sources[0])
        return self.transform(data) if self.transform is not None else data


def tensor_type(name: str, shape: tuple[int, ...], weight_type: QT) -> QT:
    """The GGUF type llama.cpp gives a tensor (ModelBase.prepare_tensors)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    if name.endswith(ALWAYS_F32):
        return QT.F32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if shape[-1] % block != 0:  # gguf.quants.quantize raises QuantError; llama.cpp falls back to F16
        return QT.F16
    return weight_type


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: within each head, rows [first half | second half] become
    interleaved (r0, r_h, r1, r_h+1, ...), so that rope NORM's adjacent pairs are HF's (i, i + d/2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Dims:
    """The shapes a checkpoint must have, from its config."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int

    @classmethod
    def from_hparams(cls, spec: ArchSpec, hp: dict[str, Any]) -> "Dims":
        def need(key: str) -> Any:
            if hp.get(key) is None:
                raise ValueError(f"config.json: missing {key!r}")
            return hp[key]

        n_head = need("num_attention_heads")
        n_embd = need("hidden_size")
        n_expert = n_expert_used = n_ff_exp = n_ff_shexp = 0
        if spec.moe:
            n_expert = hp.get("num_local_experts") or need("num_experts")
            n_expert_used = need("num_experts_per_tok")
            n_ff_exp = need(spec.expert_ff_key)
            if spec.shared_expert:
                n_ff_shexp = need("shared_expert_intermediate_size")
        return cls(
            n_vocab=need("vocab_size"), n_embd=n_embd, n_layer=need("num_hidden_layers"), n_head=n_head,
            n_head_kv=hp.get("num_key_value_heads") or n_head, head_dim=hp.get("head_dim") or n_embd // n_head,
            n_ff=need("intermediate_size"), n_expert=n_expert, n_expert_used=n_expert_used,
            n_ff_exp=n_ff_exp, n_ff_shexp=n_ff_shexp)


def check_supported(spec: ArchSpec, hp: dict[str, Any]) -> None:
    """Reject configurations whose checkpoints our tensor plan would not describe."""
    if hp.get("attention_bias") and not spec.qkv_bias:
        raise ValueError("config.json: attention_bias=True is not supported for this architecture")
    if hp.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=True is not supported")
    if spec.moe == "mlp":
        if hp.get("mlp_only_layers") or hp.get("decoder_sparse_step", 1) != 1:
            raise ValueError("config.json: dense layers inside an MoE model (mlp_only_layers / "
                             "decoder_sparse_step) are not supported")


def plan_tensors(spec: ArchSpec, hp: dict[str, Any], checkpoint: SafetensorsIndex,
                 weight_type: QT) -> list[PlannedTensor]:
    """Every GGUF tensor, in file order, with its HF sources, after checking that the checkpoint
    holds exactly the expected tensors with the expected shapes."""
    check_supported(spec, hp)
    d = Dims.from_hparams(spec, hp)
    q_rows, kv_rows = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    expected: dict[str, tuple[int, ...]] = {}  # HF name -> shape, for every tensor the plan reads
    plan: list[PlannedTensor] = []

    def add(gguf_name: str, hf_names: list[str], hf_shape: tuple[int, ...], transform=None, stack=False):
        for n in hf_names:
            expected[n] = hf_shape
        shape = (len(hf_names), *hf_shape) if stack else hf_shape
        plan.append(PlannedTensor(gguf_name, shape, tensor_type(gguf_name, shape, weight_type), hf_names, stack,
                                  transform))

    rope_freqs = llama3_rope_freqs(spec, hp, d)
    if rope_freqs is not None:  # LlamaModel.generate_extra_tensors comes before the checkpoint's tensors
        plan.append(PlannedTensor("rope_freqs.weight", rope_freqs.shape, QT.F32, [], generate=lambda: rope_freqs))

    add("token_embd.weight", ["model.embed_tokens.weight"], (d.n_vocab, d.n_embd))
    permute_q = (lambda w: permute_rows(w, d.n_head)) if spec.permute_qk else None
    permute_k = (lambda w: permute_rows(w, d.n_head_kv)) if spec.permute_qk else None
    shapes = {  # HF shape of each per-layer tensor
        "input_layernorm.weight": (d.n_embd,), "post_attention_layernorm.weight": (d.n_embd,),
        "self_attn.q_proj.weight": (q_rows, d.n_embd), "self_attn.k_proj.weight": (kv_rows, d.n_embd),
        "self_attn.v_proj.weight": (kv_rows, d.n_embd), "self_attn.o_proj.weight": (d.n_embd, q_rows),
        "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
        "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.q_norm.weight": (d.head_dim,) if spec.qk_norm == "head" else (q_rows,),
        "self_attn.k_norm.weight": (d.head_dim,) if spec.qk_norm == "head" else (kv_rows,),
        "mlp.gate_proj.weight": (d.n_ff, d.n_embd), "mlp.up_proj.weight": (d.n_ff, d.n_embd),
        "mlp.down_proj.weight": (d.n_embd, d.n_ff),
        "mlp.shared_expert_gate.weight": (1, d.n_embd),
        "mlp.shared_expert.gate_proj.weight": (d.n_ff_shexp, d.n_embd),
        "mlp.shared_expert.up_proj.weight": (d.n_ff_shexp, d.n_embd),
        "mlp.shared_expert.down_proj.weight": (d.n_embd, d.n_ff_shexp),
    }
    transforms = {"self_attn.q_proj.weight": permute_q, "self_attn.q_proj.bias": permute_q,
                  "self_attn.k_proj.weight": permute_k, "self_attn.k_proj.bias": permute_k}
    for i in range(d.n_layer):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        groups = [ATTENTION, QKV_BIAS if spec.qkv_bias else {}, QK_NORM if spec.qk_norm else {}, FFN_NORM]
        if not spec.moe:
            groups.append(DENSE_FFN)
        for group in groups:
            for hf_name, gguf_name in group.items():
                add(blk + gguf_name, [hf + hf_name], shapes[hf_name], transforms.get(hf_name))
        if spec.moe:
            add(blk + "ffn_gate_inp.weight", [f"{hf}{spec.moe}.gate.weight"], (d.n_expert, d.n_embd))
            for proj, gguf_name in zip(spec.expert_proj, EXPERT_GGUF):
                hf_shape = (d.n_embd, d.n_ff_exp) if gguf_name.startswith("ffn_down") else (d.n_ff_exp, d.n_embd)
                add(blk + gguf_name, [f"{hf}{spec.moe}.experts.{e}.{proj}.weight" for e in range(d.n_expert)], hf_shape,
                    stack=True)
            if spec.shared_expert:
                for hf_name, gguf_name in SHARED_EXPERT.items():
                    add(blk + gguf_name, [hf + hf_name], shapes[hf_name])
    add("output_norm.weight", ["model.norm.weight"], (d.n_embd,))
    if "lm_head.weight" in checkpoint:  # absent when the embeddings are tied: llama.cpp reuses token_embd
        add("output.weight", ["lm_head.weight"], (d.n_vocab, d.n_embd))

    for name, shape in expected.items():
        if name not in checkpoint:
            raise ValueError(f"missing tensor {name!r} in the checkpoint")
        if checkpoint.shape(name) != shape:
            raise ValueError(f"tensor {name!r} has shape {list(checkpoint.shape(name))}, expected {list(shape)}")
        checkpoint.check_dtype(name)
    unexpected = [n for n in checkpoint.entries if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} in the checkpoint"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return plan


# ----------------------------------------------------------------------------------------------
# metadata


def rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """The rope settings as TextModel.__init__ normalises them: transformers 5's `rope_parameters`
    or the older `rope_scaling`, with rope_theta and rope_type filled in."""
    params = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params:
        for key in ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"):
            if hp.get(key) is not None:
                params["rope_theta"] = hp[key]
                break
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def llama3_rope_freqs(spec: ArchSpec, hp: dict[str, Any], d: Dims) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors: Llama 3.1-style rope scaling is stored as per-frequency
    divisors in `rope_freqs.weight` [head_dim / 2]; None when the config does not use it."""
    params = rope_parameters(hp)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    if not spec.llama_extras:
        raise ValueError(f"rope type 'llama3' is not supported for architecture {spec.arch!r}")
    # float32 throughout, as llama.cpp computes it in torch (numpy's powf may differ in the last bit)
    base = params.get("rope_theta", 10000.0)
    dim = d.head_dim
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = params.get("factor", 8.0)
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    old_context_len = hp.get("original_max_position_embeddings", 8192)  # sic: llama.cpp reads the top level
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(
                high_freq_factor - low_freq_factor)
            factors.append(np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(factors, dtype=np.float32)


def first(hp: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((hp[k] for k in keys if hp.get(k) is not None), None)


def write_metadata(w: gguf.GGUFWriter, spec: ArchSpec, hp: dict[str, Any], hf_dir: Path, ftype: LlamaFileType) -> None:
    """All key/value pairs, in llama.cpp's order (ModelBase.prepare_metadata, then TextModel's
    set_vocab). Expects the tensor infos to be in the writer already (for the size label)."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, hf_dir, None, total)
    if meta.name is None:
        meta.name = hf_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    write_hparams(w, spec, hp, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, spec, hp, hf_dir)


def write_hparams(w: gguf.GGUFWriter, spec: ArchSpec, hp: dict[str, Any], ftype: LlamaFileType) -> None:
    """TextModel.set_gguf_parameters and the per-architecture additions."""
    w.add_block_count(hp["num_hidden_layers"])
    n_ctx = first(hp, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length"))
    if n_ctx is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(hp["hidden_size"])
    if hp.get("intermediate_size") is not None:
        w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    if hp.get("num_key_value_heads") is not None:
        w.add_head_count_kv(hp["num_key_value_heads"])

    rope = rope_parameters(hp)
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type in (None, "default") or rope_type.lower() == "llama3":
        pass  # llama3: rope_freqs.weight (see llama3_rope_freqs)
    elif rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
        attn_factor = rope.get("attention_factor", rope.get("attn_factor"))
        if attn_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(attn_factor)
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    else:
        raise ValueError(f"config.json: unsupported rope scaling {rope_type!r} (supported: default, linear, yarn, "
                         "llama3 for llama)")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])

    rms_eps = first(hp, ("rms_norm_eps", "norm_eps"))
    if spec.rms_eps is not None:
        rms_eps = spec.rms_eps
    if rms_eps is not None:
        w.add_layer_norm_rms_eps(rms_eps)
    n_expert = first(hp, ("num_local_experts", "num_experts"))
    if n_expert is not None:
        w.add_expert_count(n_expert)
    n_expert_used = first(hp, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    if n_expert_used is not None:
        w.add_expert_used_count(n_expert_used)
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)

    if spec.llama_extras:  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    if spec.moe_ff_keys:  # Qwen2MoeModel.set_gguf_parameters
        if hp.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
        if hp.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])


# ----------------------------------------------------------------------------------------------
# tokenizer


def does_token_look_special(token: str) -> bool:
    """TextModel.does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_tokens(tokenizer_file: Path, vocab_size: int | None) -> tuple[list[str], list[int]]:
    """Token texts and types by id, as TextModel.get_vocab_base decides them: ids with no token
    become "[PAD{i}]" (UNUSED); added tokens are CONTROL when special or special-looking, else
    USER_DEFINED; all others NORMAL."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has token id {max(vocab.values())}, beyond vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    added_contents = {a.content for a in added.values()}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added_contents:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or does_token_look_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def write_vocab(w: gguf.GGUFWriter, spec: ArchSpec, hp: dict[str, Any], hf_dir: Path) -> None:
    """TextModel._set_vocab_gpt2 (LlamaModel.set_vocab adds add_space_prefix before it and
    add_bos_token=False after it for 49152-token vocabularies)."""
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.json")
    if (hf_dir / "tokenizer.model").is_file():
        raise ValueError(f"{hf_dir}: SentencePiece tokenizers (tokenizer.model) are not supported; "
                         "only GPT-2-style byte-level BPE")
    with open(tokenizer_file, encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tokenizer_file}: only GPT-2-style byte-level BPE tokenizers are supported "
                         f"(model type {model.get('type')!r}, byte_fallback={model.get('byte_fallback')})")

    if spec.llama_extras and (hf_dir / "tokenizer_config.json").is_file():
        with open(hf_dir / "tokenizer_config.json", encoding="utf-8") as f:
            add_prefix_space = json.load(f).get("add_prefix_space")
        if add_prefix_space is not None:
            w.add_add_space_prefix(add_prefix_space)

    tokens, types = vocab_tokens(tokenizer_file, hp.get("vocab_size"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges, bos/eos/unk/pad ids, add_*_token, chat_template: gguf's SpecialVocab, as llama.cpp
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)
    if spec.llama_extras and hp.get("vocab_size", 32000) == 49152:
        w.add_add_bos_token(False)  # LlamaModel.set_vocab: "Apply to granite small models only" (and SmolLM)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's tokenizer.ggml.pre name for this tokenizer (weightstream.engine.formats.tokenizer decides it)."""

    name = pre_name_for_hf_tokenizer(tokenizer_json)
    if not name:
        raise ValueError("BPE pre-tokenizer not recognized (no llama.cpp tokenizer.ggml.pre name for it)")
    return name
