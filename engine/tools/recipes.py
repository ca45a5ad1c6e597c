"""File-type recipes (`q2_k`, `q3_k_m`, `q4_k_m`, `q8_0`): which GGML type each tensor of a model gets.

The rules are llama.cpp's (src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type_impl
and tensor_type_fallback), restricted to these four file types and the tensor names our
architectures have; the code is ours. In short:

- not quantized (F32): 1-D tensors, `*_norm.weight`, tensors not named `*.weight`, the routers
  `ffn_gate_inp` (and the shared-expert gate `ffn_gate_inp_shexp`), the linear-attention layers'
  short convolution `ssm_conv1d` (llama.cpp: "do not quantize Mamba's small conv1d weights");
- `output.weight` (or `token_embd.weight` when the embeddings are tied): Q6_K, or Q8_0 when its
  rows are not a multiple of Q6_K's 256 (and Q8_0 in the q8_0 recipe);
- attn_v, attn_output and ffn_down get more bits (table in README.md), in q4_k_m every few layers
  (llama.cpp's use_more_bits: the first and last eighth and every third layer between);
  models with exactly 8 experts (Mixtral) keep attn_v / attn_k in Q8_0 and attn_output in Q5_K;
- rows that the chosen type's block does not divide fall back as current llama.cpp does:
  Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 if 32 does not divide
  either. (Older llama.cpp used IQ4_NL for Q2_K / Q3_K; we do not write IQ types.)

One deliberate difference: routed experts (`*_exps`) always take the recipe's base type (Q2_K in
q2_k, ...), where llama.cpp would bump `ffn_down_exps` like a dense ffn_down. The experts are what
streams from flash on every token, so they stay at the size the recipe's name promises; the dense
and shared-expert ffn_down still get llama.cpp's extra bits.

llama.cpp counts attn_v / ffn_down tensors in its loader's order (by layer number, then name), so
its counter is the layer number; we read the layer from the name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType


@dataclass(frozen=True)
class Recipe:
    name: str  # what the CLI takes: q2_k, q3_k_m, q4_k_m, q8_0
    file_type: LlamaFileType  # general.file_type
    base: QT  # the type a matrix gets unless a rule below says otherwise


RECIPES: dict[str, Recipe] = {
    "q2_k": Recipe("q2_k", LlamaFileType.MOSTLY_Q2_K, QT.Q2_K),
    "q3_k_m": Recipe("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, QT.Q3_K),
    "q4_k_m": Recipe("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, QT.Q4_K),
    "q8_0": Recipe("q8_0", LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}

# tensor_type_fallback: the 32-element type a 256-block type becomes when its rows do not divide
FALLBACK: dict[QT, QT] = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
                          QT.Q6_K: QT.Q8_0}

# Not quantized by name (tensor_allows_quantization), besides 1-D tensors and non-".weight" ones.
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters the rules look at."""

    n_layer: int
    n_expert: int = 0
    n_head: int = 1
    n_head_kv: int = 1
    arch: str = ""

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)

    @classmethod
    def from_metadata(cls, meta: dict) -> "ModelShape":
        arch = meta.get("general.architecture", "")

        def get(key, default):
            v = meta.get(f"{arch}.{key}", default)
            return int(v[0] if isinstance(v, list) else v)

        n_head = get("attention.head_count", 1)
        return cls(get("block_count", 0), get("expert_count", 0), n_head, get("attention.head_count_kv", n_head), arch)


def get_recipe(name: str) -> Recipe:
    recipe = RECIPES.get(str(name).lower())
    if recipe is None:
        raise ValueError(f"unknown quantization type {name!r}; supported: {', '.join(RECIPES)}")
    return recipe


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M recipes."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith(".weight") and not name.endswith(KEEP_F32)


def tensor_types(recipe: Recipe | str, tensors: list[tuple[str, tuple[int, ...]]], model: ModelShape) -> dict[str, QT]:
    """name -> type for every tensor of a model. tensors: (name, NumPy shape) pairs."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    tied = not any(name == "output.weight" for name, _ in tensors)
    return {name: tensor_type(recipe, name, tuple(shape), model, tied) for name, shape in tensors}


def tensor_type(recipe: Recipe, name: str, shape: tuple[int, ...], model: ModelShape, tied: bool) -> QT:
    """One tensor's type (llama_tensor_get_type, then tensor_type_fallback)."""
    if not quantizable(name, shape):
        return QT.F32
    return fallback(_preferred(recipe, name, shape, model, tied), shape[-1])


def fallback(qtype: QT, cols: int) -> QT:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype
    qtype = FALLBACK.get(qtype, QT.F16)
    return qtype if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else QT.F16


def _preferred(recipe: Recipe, name: str, shape: tuple[int, ...], model: ModelShape, tied: bool) -> QT:
    ft, L = recipe.file_type, LlamaFileType
    new = recipe.base
    m = _LAYER.match(name)
    layer, n_layer = (int(m.group(1)) if m else 0), max(1, model.n_layer)
    eight = model.n_expert == 8

    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if shape[-1] % gguf.GGML_QUANT_SIZES[new][0] != 0:
            return QT.Q8_0
        return QT.Q6_K if new != QT.Q8_0 else new
    if name == "token_embd.weight" or "_exps." in name:
        return new  # experts: the base type (see the module docstring)
    if "attn_v.weight" in name or "attn_qkv.weight" in name or "attn_kv_b.weight" in name:
        if "attn_qkv.weight" in name:  # fused QKV: the hybrids' linear-attention q, k, v
            new = {L.MOSTLY_Q3_K_M: QT.Q4_K, L.MOSTLY_Q4_K_M: QT.Q5_K}.get(ft, new)
        elif ft == L.MOSTLY_Q2_K:
            new = QT.Q4_K if model.n_gqa >= 4 else QT.Q3_K
        elif ft == L.MOSTLY_Q3_K_M:
            new = QT.Q5_K if layer < 2 else QT.Q4_K
        elif ft == L.MOSTLY_Q4_K_M and use_more_bits(layer, n_layer):
            new = QT.Q6_K
        if model.arch == "llama" and model.n_layer == 80 and model.n_head != model.n_head_kv:  # LLM_TYPE_70B
            if new in (QT.Q3_K, QT.Q4_K):
                new = QT.Q5_K
        return QT.Q8_0 if eight else new
    if "attn_k.weight" in name:
        return QT.Q8_0 if eight else new
    if "ffn_down" in name:  # ffn_down and ffn_down_shexp (experts returned above)
        if ft == L.MOSTLY_Q2_K:
            return QT.Q3_K
        if ft == L.MOSTLY_Q3_K_M:
            return QT.Q5_K if layer < n_layer // 16 else QT.Q4_K
        if ft == L.MOSTLY_Q4_K_M and use_more_bits(layer, n_layer):
            return QT.Q6_K
        return new
    if "attn_output.weight" in name:
        if eight:
            return QT.Q5_K if ft in (L.MOSTLY_Q2_K, L.MOSTLY_Q3_K_M, L.MOSTLY_Q4_K_M) else new
        return {L.MOSTLY_Q2_K: QT.Q3_K, L.MOSTLY_Q3_K_M: QT.Q4_K}.get(ft, new)
    return new
