"""Hugging Face safetensors -> GGUF v3, written the way llama.cpp's convert_hf_to_gguf.py writes it.

Twelve Hugging Face architectures map onto nine llama.cpp architectures (ARCHITECTURES below), among
them the Qwen3-Next family's hybrids (qwen3next, qwen35, qwen35moe: Gated DeltaNet linear attention
beside gated attention; their conventions are listed above LINEAR_ATTENTION). The facts come from
llama.cpp (conversion/{base,llama,qwen,olmo}.py, formerly one convert_hf_to_gguf.py, and gguf-py's
constants / tensor_mapping); the code is ours. What we follow:

- tensor names (`token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_exps`, ...) and shapes: per-expert HF
  matrices are stacked into one 3-D tensor per layer, NumPy shape [n_expert, n_ff, n_embd] for
  gate/up and [n_expert, n_embd, n_ff] for down;
- the `llama` architecture's Q/K row permutation (LlamaModel.permute): llama.cpp rotates adjacent
  pairs (rope NORM) where Hugging Face rotates halves, so the rows of each head are interleaved;
- transformers 5's fused experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) are split
  and used as they are, as Qwen2MoeModel does; a multimodal wrapper's text model
  (`model.language_model.*`, config.json's `text_config`) converts as the text model alone;
- tensor types (ModelBase.prepare_tensors): 1-D tensors, `*_norm.weight`, biases, the MoE routers
  (`ffn_gate_inp`, `ffn_gate_inp_shexp`) and `ssm_conv1d` stay F32; the rest takes `out_type`; rows
  that Q8_0 cannot hold (length not a multiple of 32) fall back to F16;
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

import copy
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
    fused_experts: bool = False  # Qwen2MoeModel: also takes transformers 5's fused mlp.experts.{gate_up,down}_proj
    # Qwen3NextModel and its subclasses (hybrid: Gated DeltaNet linear attention + gated attention),
    # named by how the checkpoint packs the linear-attention input projections: "qkvz" (qwen3next:
    # in_proj_qkvz and in_proj_ba, interleaved per key head) or "qkv" (qwen35, qwen35moe:
    # in_proj_qkv / _z / _b / _a, whose value heads llama.cpp reorders). See the hybrid conventions
    # above LINEAR_ATTENTION.
    linear_attn: str | None = None
    mrope: bool = False  # _Qwen35MRopeMixin: rope.dimension_sections always written ([11, 11, 10, 0] by default)
    multimodal: bool = False  # *ForConditionalGeneration: the text model is model.language_model.*; model.visual.* is skipped


# What the Qwen3-Next family shares: per-head q/k norms and Qwen2MoeModel's keys; the MoE members
# have its sparse block with a sigmoid-gated shared expert.
_QWEN35_DENSE = {"qk_norm": "head", "moe_ff_keys": True}
_QWEN3NEXT_MOE = {"qk_norm": "head", "moe": "mlp", "expert_ff_key": "moe_intermediate_size", "shared_expert": True,
                  "moe_ff_keys": True, "fused_experts": True}

ARCHITECTURES: dict[str, ArchSpec] = {
    # conversion/llama.py: LlamaModel (LlamaForCausalLM and MixtralForCausalLM both become `llama`)
    "LlamaForCausalLM": ArchSpec("llama", permute_qk=True, llama_extras=True),
    "MixtralForCausalLM": ArchSpec("llama", permute_qk=True, llama_extras=True, moe="block_sparse_moe",
                                   expert_proj=("w1", "w3", "w2")),
    # conversion/qwen.py: Qwen2Model, Qwen3Model(Qwen2Model), Qwen2MoeModel, Qwen3MoeModel(Qwen2MoeModel)
    "Qwen2ForCausalLM": ArchSpec("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qk_norm="head"),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", qkv_bias=True, moe="mlp", expert_ff_key="moe_intermediate_size",
                                    shared_expert=True, moe_ff_keys=True, fused_experts=True),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", qk_norm="head", moe="mlp", expert_ff_key="moe_intermediate_size",
                                    moe_ff_keys=True, fused_experts=True),
    # conversion/olmo.py: OlmoeModel
    "OlmoeForCausalLM": ArchSpec("olmoe", qk_norm="full", moe="mlp", rms_eps=1e-5),
    # conversion/qwen.py: Qwen3NextModel(_QwenMtpMixin, Qwen2MoeModel); Qwen3_5TextModel and
    # Qwen3_5MoeTextModel(_Qwen35MRopeMixin, _LinearAttentionVReorderBase(Qwen3NextModel)), as with --no-mtp
    "Qwen3NextForCausalLM": ArchSpec("qwen3next", linear_attn="qkvz", **_QWEN3NEXT_MOE),
    "Qwen3_5ForCausalLM": ArchSpec("qwen35", linear_attn="qkv", mrope=True, **_QWEN35_DENSE),
    "Qwen3_5ForConditionalGeneration": ArchSpec("qwen35", linear_attn="qkv", mrope=True, multimodal=True,
                                                **_QWEN35_DENSE),
    "Qwen3_5MoeForCausalLM": ArchSpec("qwen35moe", linear_attn="qkv", mrope=True, **_QWEN3NEXT_MOE),
    "Qwen3_5MoeForConditionalGeneration": ArchSpec("qwen35moe", linear_attn="qkv", mrope=True, multimodal=True,
                                                   **_QWEN3NEXT_MOE),
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

# The hybrid conventions: the Qwen3-Next family (ArchSpec.linear_attn), as Qwen3NextModel.modify_tensors
# and _LinearAttentionVReorderBase.modify_tensors write it:
# - each layer is either linear attention (Gated DeltaNet: the tables below) or gated attention
#   (ATTENTION, whose q_proj holds query and output gate per head: 2 * n_head * head_dim rows, plus
#   QK_NORM), per config.json's layer_types (else every full_attention_interval-th layer is attention);
# - post_attention_layernorm is `post_attention_norm`, not ffn_norm;
# - these models' RMSNorm scales by (1 + w): every *norm.weight is written + 1, except
#   linear_attn.norm (a gated RMSNorm that scales by w);
# - A_log is written as A = -exp(A_log) (`ssm_a`, no .weight suffix), dt_bias as `ssm_dt.bias`,
#   conv1d's [channels, 1, kernel] squeezed to [channels, kernel];
# - qwen3next's in_proj_qkvz ([q, k, v, z] per key head) is split into attn_qkv ([all q; all k;
#   all v]) and attn_gate (all z); its in_proj_ba stays interleaved as ssm_ba;
# - qwen35/qwen35moe with fewer key heads than value heads: value heads go from grouped order
#   (by key head: G0v0, G0v1, ..., G1v0, ...) to tiled order (G0v0, G1v0, ..., G0v1, G1v1, ...), so that
#   ggml can broadcast the key heads (reorder_v_heads);
# - mtp.* (the multi-token-prediction head) is skipped, as llama.cpp's --no-mtp does.
HYBRID_POST_ATTENTION_NORM = {"post_attention_layernorm.weight": "post_attention_norm.weight"}
LINEAR_ATTENTION = {  # shared by both layouts
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
}
LINEAR_ATTENTION_QKV = {  # qwen35, qwen35moe
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
}
LINEAR_ATTENTION_QKVZ_GGUF = ("attn_qkv.weight", "attn_gate.weight", "ssm_ba.weight")  # qwen3next
MTP_PREFIXES = ("mtp.", "model.mtp.")

# Checkpoint entries llama.cpp skips (ModelBase.prepare_tensors: "we don't need these").
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

# Tensors llama.cpp always keeps in F32 (besides 1-D tensors, *_norm.weight and non-.weight tensors):
# the MoE routers and the linear-attention layers' short convolution.
ROUTERS = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")
ALWAYS_F32 = (*ROUTERS, ".ssm_conv1d.weight")


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
    hf_arch = model_architecture(hparams)
    spec = ARCHITECTURES.get(hf_arch)
    if spec is None:
        raise ValueError(f"{hf_dir}: unsupported architecture {hf_arch!r}; supported: {', '.join(ARCHITECTURES)}")
    hparams = text_hparams(hparams)
    ftype, weight_type = OUT_TYPES[out_type] if recipe is None else (recipe.file_type, QT.F32)

    checkpoint = SafetensorsIndex(hf_dir).renamed(lambda name: text_model_name(spec, name))
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


def model_architecture(hp: dict[str, Any]) -> str:
    """The Hugging Face architecture llama.cpp converts the text model as (get_model_architecture):
    text_config's `architectures` if it has one, else the config's."""
    arches = (hp.get("text_config") or {}).get("architectures") or hp.get("architectures") or ["<none>"]
    return arches[0]


def text_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """The config with a multimodal model's text_config moved to the top level, as TextModel.__init__
    does: the language model's settings are what the GGUF describes."""
    return {**hp, **hp["text_config"]} if isinstance(hp.get("text_config"), dict) else hp


def text_model_name(spec: ArchSpec, name: str) -> str | None:
    """A checkpoint tensor's name as llama.cpp's filter_tensors leaves it for the text model, or None
    for tensors it skips: a multimodal model's vision tower, the Qwen3-Next family's MTP head."""
    if spec.multimodal:
        if name.startswith("model.visual."):
            return None
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
    if spec.linear_attn and name.startswith(MTP_PREFIXES):
        return None
    return name


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

    def renamed(self, rename: Callable[[str], str | None]) -> "SafetensorsIndex":
        """The same checkpoint with every name passed through `rename`; names it maps to None are left out."""
        view = copy.copy(self)
        view.entries = {}
        for name, entry in self.entries.items():
            new_name = rename(name)
            if new_name is None:
                continue
            if new_name in view.entries:
                raise ValueError(f"the checkpoint holds {new_name!r} twice ({name!r} is read as that name too)")
            view.entries[new_name] = entry
        return view

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
        return np.ascontiguousarray(self.transform(data)) if self.transform is not None else data


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
class LinearAttentionDims:
    """A Gated DeltaNet layer's shapes (the Qwen3-Next family's linear attention)."""

    n_k_heads: int  # linear_num_key_heads (also the query heads)
    n_v_heads: int  # linear_num_value_heads, a multiple of n_k_heads
    k_dim: int  # linear_key_head_dim
    v_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim

    @property
    def qk_rows(self) -> int:  # rows of all query (or all key) heads
        return self.n_k_heads * self.k_dim

    @property
    def v_rows(self) -> int:  # rows of all value heads (also the output gate's)
        return self.n_v_heads * self.v_dim

    @property
    def conv_channels(self) -> int:  # the short convolution runs over q, k and v
        return 2 * self.qk_rows + self.v_rows

    @property
    def v_per_k(self) -> int:
        return self.n_v_heads // self.n_k_heads


@dataclass(frozen=True)
class Dims:
    """The shapes a checkpoint must have, from its config."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # the dense FFN's width (0 where an MoE config has none)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    linear: LinearAttentionDims | None = None  # the Qwen3-Next family
    recurrent: tuple[bool, ...] = ()  # per layer: linear attention (True) or attention (the Qwen3-Next family)

    @classmethod
    def from_hparams(cls, spec: ArchSpec, hp: dict[str, Any]) -> "Dims":
        def need(key: str) -> Any:
            if hp.get(key) is None:
                raise ValueError(f"config.json: missing {key!r}")
            return hp[key]

        n_head = need("num_attention_heads")
        n_embd = need("hidden_size")
        n_layer = need("num_hidden_layers")
        n_expert = n_expert_used = n_ff_exp = n_ff_shexp = 0
        if spec.moe:
            n_expert = hp.get("num_local_experts") or need("num_experts")
            n_expert_used = need("num_experts_per_tok")
            n_ff_exp = need(spec.expert_ff_key)
            if spec.shared_expert:
                n_ff_shexp = need("shared_expert_intermediate_size")
        linear, recurrent = None, ()
        if spec.linear_attn:
            linear = LinearAttentionDims(
                n_k_heads=need("linear_num_key_heads"), n_v_heads=need("linear_num_value_heads"),
                k_dim=need("linear_key_head_dim"), v_dim=need("linear_value_head_dim"),
                conv_kernel=need("linear_conv_kernel_dim"))
            recurrent = recurrent_layers(hp, n_layer)
        return cls(
            n_vocab=need("vocab_size"), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            n_head_kv=hp.get("num_key_value_heads") or n_head, head_dim=hp.get("head_dim") or n_embd // n_head,
            n_ff=(hp.get("intermediate_size") or 0) if spec.moe else need("intermediate_size"), n_expert=n_expert,
            n_expert_used=n_expert_used, n_ff_exp=n_ff_exp, n_ff_shexp=n_ff_shexp, linear=linear,
            recurrent=recurrent)


def recurrent_layers(hp: dict[str, Any], n_layer: int) -> tuple[bool, ...]:
    """Which layers are linear attention: config.json's layer_types, else (as transformers and
    llama.cpp's loader decide) all but every full_attention_interval-th layer."""
    layer_types = hp.get("layer_types")
    if layer_types is None:
        interval = hp.get("full_attention_interval", 4)
        return tuple((i + 1) % interval != 0 for i in range(n_layer))
    if len(layer_types) != n_layer:
        raise ValueError(f"config.json: layer_types has {len(layer_types)} entries, expected num_hidden_layers "
                         f"({n_layer})")
    unknown = sorted(set(layer_types) - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"config.json: unsupported layer_types {unknown} (supported: linear_attention, "
                         "full_attention)")
    return tuple(t == "linear_attention" for t in layer_types)


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
    if spec.linear_attn:
        k_dim, v_dim = hp.get("linear_key_head_dim"), hp.get("linear_value_head_dim")
        if k_dim != v_dim:  # llama.cpp's loader sizes both from ssm.state_size
            raise ValueError(f"config.json: linear_key_head_dim ({k_dim}) != linear_value_head_dim ({v_dim}) "
                             "is not supported (llama.cpp assumes equal key and value head sizes)")
        n_k, n_v = hp.get("linear_num_key_heads"), hp.get("linear_num_value_heads")
        if n_k and n_v and n_v % n_k != 0:
            raise ValueError(f"config.json: linear_num_value_heads ({n_v}) must be a multiple of "
                             f"linear_num_key_heads ({n_k})")


class _Planner:
    """Collects the plan (GGUF tensors and their HF sources) and the HF tensors it reads with their shapes."""

    def __init__(self, weight_type: QT):
        self.weight_type = weight_type
        self.expected: dict[str, tuple[int, ...]] = {}  # HF name -> shape, for every tensor the plan reads
        self.tensors: list[PlannedTensor] = []

    def add(self, gguf_name: str, hf_names: list[str], hf_shape: tuple[int, ...], transform=None, stack=False,
            shape: tuple[int, ...] | None = None) -> None:
        """One GGUF tensor read from hf_names (each of hf_shape; stacked on a new axis 0 if `stack`).
        `shape` is the GGUF tensor's shape where `transform` changes it."""
        for n in hf_names:
            self.expected[n] = hf_shape
        if shape is None:
            shape = (len(hf_names), *hf_shape) if stack else hf_shape
        self.tensors.append(PlannedTensor(gguf_name, shape, tensor_type(gguf_name, shape, self.weight_type),
                                          hf_names, stack, transform))

    def check(self, checkpoint: SafetensorsIndex) -> None:
        """The checkpoint holds exactly the tensors the plan reads, with the expected shapes and dtypes."""
        for name, shape in self.expected.items():
            if name not in checkpoint:
                raise ValueError(f"missing tensor {name!r} in the checkpoint")
            if checkpoint.shape(name) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(checkpoint.shape(name))}, expected {list(shape)}")
            checkpoint.check_dtype(name)
        unexpected = [n for n in checkpoint.entries if n not in self.expected and not n.endswith(IGNORED_SUFFIXES)]
        if unexpected:
            raise ValueError(f"unexpected tensor {unexpected[0]!r} in the checkpoint"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def plan_tensors(spec: ArchSpec, hp: dict[str, Any], checkpoint: SafetensorsIndex,
                 weight_type: QT) -> list[PlannedTensor]:
    """Every GGUF tensor, in file order, with its HF sources, after checking that the checkpoint
    holds exactly the expected tensors with the expected shapes."""
    check_supported(spec, hp)
    d = Dims.from_hparams(spec, hp)
    planner = _Planner(weight_type)
    add = planner.add

    rope_freqs = llama3_rope_freqs(spec, hp, d)
    if rope_freqs is not None:  # LlamaModel.generate_extra_tensors comes before the checkpoint's tensors
        planner.tensors.append(PlannedTensor("rope_freqs.weight", rope_freqs.shape, QT.F32, [],
                                             generate=lambda: rope_freqs))

    add("token_embd.weight", ["model.embed_tokens.weight"], (d.n_vocab, d.n_embd))
    shapes = layer_shapes(spec, d)
    for i in range(d.n_layer):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        if spec.linear_attn:
            plan_hybrid_mixer(add, spec, d, shapes, hf, blk, linear=d.recurrent[i])
        else:
            plan_attention(add, spec, d, shapes, hf, blk)
        plan_ffn(add, spec, d, shapes, hf, blk, checkpoint)
    add("output_norm.weight", ["model.norm.weight"], (d.n_embd,), plus_one if spec.linear_attn else None)
    if "lm_head.weight" in checkpoint:  # absent when the embeddings are tied: llama.cpp reuses token_embd
        add("output.weight", ["lm_head.weight"], (d.n_vocab, d.n_embd))
    planner.check(checkpoint)
    return planner.tensors


def layer_shapes(spec: ArchSpec, d: Dims) -> dict[str, tuple[int, ...]]:
    """The HF shape of each per-layer tensor (name after "model.layers.N.")."""
    q_rows, kv_rows = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    q_proj_rows = 2 * q_rows if spec.linear_attn else q_rows  # the Qwen3-Next family: query and gate per head
    shapes = {
        "input_layernorm.weight": (d.n_embd,), "post_attention_layernorm.weight": (d.n_embd,),
        "self_attn.q_proj.weight": (q_proj_rows, d.n_embd), "self_attn.k_proj.weight": (kv_rows, d.n_embd),
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
    if d.linear is not None:
        la = d.linear
        shapes.update({
            "linear_attn.in_proj_qkv.weight": (la.conv_channels, d.n_embd),
            "linear_attn.in_proj_z.weight": (la.v_rows, d.n_embd),
            "linear_attn.in_proj_b.weight": (la.n_v_heads, d.n_embd),
            "linear_attn.in_proj_a.weight": (la.n_v_heads, d.n_embd),
            "linear_attn.in_proj_qkvz.weight": (la.conv_channels + la.v_rows, d.n_embd),
            "linear_attn.in_proj_ba.weight": (2 * la.n_v_heads, d.n_embd),
            "linear_attn.conv1d.weight": (la.conv_channels, 1, la.conv_kernel),
            "linear_attn.dt_bias": (la.n_v_heads,),
            "linear_attn.A_log": (la.n_v_heads,),
            "linear_attn.norm.weight": (la.v_dim,),
            "linear_attn.out_proj.weight": (d.n_embd, la.v_rows),
        })
    return shapes


def plan_attention(add, spec: ArchSpec, d: Dims, shapes: dict, hf: str, blk: str) -> None:
    """A standard layer's attention and its norms (ffn_norm included)."""
    permute_q = (lambda w: permute_rows(w, d.n_head)) if spec.permute_qk else None
    permute_k = (lambda w: permute_rows(w, d.n_head_kv)) if spec.permute_qk else None
    transforms = {"self_attn.q_proj.weight": permute_q, "self_attn.q_proj.bias": permute_q,
                  "self_attn.k_proj.weight": permute_k, "self_attn.k_proj.bias": permute_k}
    groups = [ATTENTION, QKV_BIAS if spec.qkv_bias else {}, QK_NORM if spec.qk_norm else {}, FFN_NORM]
    for group in groups:
        for hf_name, gguf_name in group.items():
            add(blk + gguf_name, [hf + hf_name], shapes[hf_name], transforms.get(hf_name))


def plan_hybrid_mixer(add, spec: ArchSpec, d: Dims, shapes: dict, hf: str, blk: str, linear: bool) -> None:
    """A Qwen3-Next family layer's norms and its linear or gated attention (the hybrid conventions)."""
    add(blk + "attn_norm.weight", [hf + "input_layernorm.weight"], shapes["input_layernorm.weight"], plus_one)
    if linear:
        plan_linear_attention(add, spec, d, shapes, hf, blk)
    else:
        for hf_name, gguf_name in (*ATTENTION.items(), *QK_NORM.items()):
            if hf_name != "input_layernorm.weight":
                add(blk + gguf_name, [hf + hf_name], shapes[hf_name], plus_one if "norm" in hf_name else None)
    for hf_name, gguf_name in HYBRID_POST_ATTENTION_NORM.items():
        add(blk + gguf_name, [hf + hf_name], shapes[hf_name], plus_one)


def plan_linear_attention(add, spec: ArchSpec, d: Dims, shapes: dict, hf: str, blk: str) -> None:
    """A Gated DeltaNet layer's tensors, transformed as the hybrid conventions say."""
    la = d.linear
    names = {**LINEAR_ATTENTION_QKV, **LINEAR_ATTENTION} if spec.linear_attn == "qkv" else dict(LINEAR_ATTENTION)
    if spec.linear_attn == "qkvz":  # one fused projection feeds two GGUF tensors
        qkvz, ba = hf + "linear_attn.in_proj_qkvz.weight", hf + "linear_attn.in_proj_ba.weight"
        qkv_name, gate_name, ba_name = LINEAR_ATTENTION_QKVZ_GGUF
        qkvz_shape = shapes["linear_attn.in_proj_qkvz.weight"]
        add(blk + qkv_name, [qkvz], qkvz_shape, lambda w: split_qkvz(w, la)[0], shape=(la.conv_channels, d.n_embd))
        add(blk + gate_name, [qkvz], qkvz_shape, lambda w: split_qkvz(w, la)[1], shape=(la.v_rows, d.n_embd))
        add(blk + ba_name, [ba], shapes["linear_attn.in_proj_ba.weight"])  # kept interleaved, as llama.cpp does
    transforms = linear_attention_transforms(la, tiled=spec.linear_attn == "qkv" and la.v_per_k > 1)
    gguf_shapes = {"linear_attn.conv1d.weight": (la.conv_channels, la.conv_kernel)}
    for hf_name, gguf_name in names.items():
        add(blk + gguf_name, [hf + hf_name], shapes[hf_name], transforms.get(hf_name), shape=gguf_shapes.get(hf_name))


def linear_attention_gguf_names(spec: ArchSpec) -> list[str]:
    """A linear-attention layer's GGUF tensors (after "blk.N."), in the order plan_linear_attention writes them."""
    projections = LINEAR_ATTENTION_QKV.values() if spec.linear_attn == "qkv" else LINEAR_ATTENTION_QKVZ_GGUF
    return [*projections, *LINEAR_ATTENTION.values()]


def linear_attention_transforms(la: LinearAttentionDims, tiled: bool) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """HF name -> what llama.cpp does to the tensor; `tiled`: value heads go to tiled order (qwen35
    and qwen35moe with fewer key than value heads)."""

    def v_heads(axis: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
        if not tiled:
            return lambda w: w
        return lambda w: reorder_v_heads(w, axis, la.n_k_heads, la.v_per_k, head_dim)

    def v_rows(w: np.ndarray) -> np.ndarray:  # rows [q | k | v]: only v has value heads
        return np.concatenate([w[:2 * la.qk_rows], v_heads(0, la.v_dim)(w[2 * la.qk_rows:])])

    return {
        "linear_attn.in_proj_qkv.weight": v_rows,
        "linear_attn.in_proj_z.weight": v_heads(0, la.v_dim),
        "linear_attn.in_proj_b.weight": v_heads(0, 1),
        "linear_attn.in_proj_a.weight": v_heads(0, 1),
        "linear_attn.conv1d.weight": lambda w: v_rows(w[:, 0, :]),  # [channels, 1, kernel] -> [channels, kernel]
        "linear_attn.dt_bias": v_heads(0, 1),
        # (numpy's exp and llama.cpp's torch.exp may differ in the last bit)
        "linear_attn.A_log": lambda w: -np.exp(v_heads(0, 1)(w)),
        "linear_attn.out_proj.weight": v_heads(1, la.v_dim),
    }


def plan_ffn(add, spec: ArchSpec, d: Dims, shapes: dict, hf: str, blk: str, checkpoint: SafetensorsIndex) -> None:
    """A layer's FFN: dense, or the router, the routed experts and the shared expert."""
    if not spec.moe:
        for hf_name, gguf_name in DENSE_FFN.items():
            add(blk + gguf_name, [hf + hf_name], shapes[hf_name])
        return
    add(blk + "ffn_gate_inp.weight", [f"{hf}{spec.moe}.gate.weight"], (d.n_expert, d.n_embd))
    experts = f"{hf}{spec.moe}.experts."
    fused = [n for n in (experts + "gate_up_proj", experts + "gate_up_proj.weight") if n in checkpoint]
    if spec.fused_experts and fused:
        plan_fused_experts(add, d, blk, fused[0], experts, checkpoint)
    else:
        for proj, gguf_name in zip(spec.expert_proj, EXPERT_GGUF):
            hf_shape = (d.n_embd, d.n_ff_exp) if gguf_name.startswith("ffn_down") else (d.n_ff_exp, d.n_embd)
            add(blk + gguf_name, [f"{experts}{e}.{proj}.weight" for e in range(d.n_expert)], hf_shape, stack=True)
    if spec.shared_expert:
        for hf_name, gguf_name in SHARED_EXPERT.items():
            add(blk + gguf_name, [hf + hf_name], shapes[hf_name])


def plan_fused_experts(add, d: Dims, blk: str, gate_up: str, experts: str, checkpoint: SafetensorsIndex) -> None:
    """transformers 5's fused experts (Qwen2MoeModel.modify_tensors): gate_up_proj [n_expert,
    2 * n_ff, n_embd], gate rows first, and down_proj [n_expert, n_embd, n_ff], already stacked."""
    n_ff, suffix = d.n_ff_exp, gate_up[len(experts + "gate_up_proj"):]
    down = experts + "down_proj" + suffix
    if down not in checkpoint:  # the other spelling, else `down` is reported missing
        down = next((n for n in (experts + "down_proj", experts + "down_proj.weight") if n in checkpoint), down)
    fused_shape = (d.n_expert, 2 * n_ff, d.n_embd)
    gate_name, up_name, down_name = EXPERT_GGUF
    add(blk + gate_name, [gate_up], fused_shape, lambda w: w[:, :n_ff], shape=(d.n_expert, n_ff, d.n_embd))
    add(blk + up_name, [gate_up], fused_shape, lambda w: w[:, n_ff:], shape=(d.n_expert, n_ff, d.n_embd))
    add(blk + down_name, [down], (d.n_expert, d.n_embd, n_ff))


def plus_one(w: np.ndarray) -> np.ndarray:
    """The Qwen3-Next family's RMSNorm scales by (1 + w); GGUF stores 1 + w."""
    return w + w.dtype.type(1)


def reorder_v_heads(w: np.ndarray, axis: int, n_k_heads: int, v_per_k: int, head_dim: int) -> np.ndarray:
    """Value heads along `axis` from grouped order (the v_per_k heads of key head 0, then of key head
    1, ...) to tiled order (head 0 of every key head, then head 1 of every key head, ...), each head
    `head_dim` long (_LinearAttentionVReorderBase._reorder_v_heads)."""
    shape = w.shape
    axis %= w.ndim
    grouped = w.reshape(*shape[:axis], n_k_heads, v_per_k, head_dim, *shape[axis + 1:])
    return np.swapaxes(grouped, axis, axis + 1).reshape(shape)


def split_qkvz(w: np.ndarray, la: LinearAttentionDims) -> tuple[np.ndarray, np.ndarray]:
    """qwen3next's in_proj_qkvz, [q, k, v, z] per key head, as llama.cpp splits it: ([all q; all k;
    all v], all z), each in key-head order."""
    q, k, vz = la.k_dim, la.k_dim, la.v_per_k * la.v_dim
    groups = w.reshape(la.n_k_heads, q + k + 2 * vz, w.shape[-1])
    parts = np.split(groups, [q, q + k, q + k + vz], axis=1)  # each [n_k_heads, rows, n_embd]
    q_rows, k_rows, v_rows, z_rows = (p.reshape(-1, w.shape[-1]) for p in parts)
    return np.concatenate([q_rows, k_rows, v_rows]), z_rows


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
    if "partial_rotary_factor" not in params:
        factor = first(hp, ("partial_rotary_factor", "rope_pct", "rope_percent"))
        if factor is not None:
            params["partial_rotary_factor"] = factor
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
    if rope.get("mrope_section") is not None:  # multimodal rope: the sections, padded to 4
        w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0] * 4)[:4])
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
    if spec.linear_attn:
        write_hybrid_hparams(w, hp)
    if spec.mrope and rope.get("mrope_section") is None:  # _Qwen35MRopeMixin: llama.cpp's loader requires them
        w.add_rope_dimension_sections(DEFAULT_MROPE_SECTIONS)


# Qwen3.5's mrope_section (transformers' default), padded to 4, for configs that leave it out
DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]


def write_hybrid_hparams(w: gguf.GGUFWriter, hp: dict[str, Any]) -> None:
    """Qwen3NextModel.set_gguf_parameters: the linear-attention shapes, which layers are recurrent,
    and the partial rope (rope.dimension_count = head_dim * partial_rotary_factor, default 0.25)."""
    w.add_ssm_conv_kernel(hp["linear_conv_kernel_dim"])
    w.add_ssm_state_size(hp["linear_key_head_dim"])
    w.add_ssm_group_count(hp["linear_num_key_heads"])
    w.add_ssm_time_step_rank(hp["linear_num_value_heads"])
    w.add_ssm_inner_size(hp["linear_value_head_dim"] * hp["linear_num_value_heads"])
    if hp.get("layer_types") is not None:  # (gguf-py's add_recurrent_layers, newer than our gguf)
        w.add_array(f"{w.arch}.attention.recurrent_layers", [t == "linear_attention" for t in hp["layer_types"]])
    # transformers 5 drops full_attention_interval from the config it loads (it becomes layer_types),
    # so llama.cpp usually writes the default; its loader prefers recurrent_layers
    w.add_full_attention_interval(hp.get("full_attention_interval", 4))
    head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    w.add_rope_dimension_count(int(head_dim * rope_parameters(hp).get("partial_rotary_factor", 0.25)))


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
