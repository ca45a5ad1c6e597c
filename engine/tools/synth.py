"""Synthetic MoE GGUF files with a real model's exact tensor shapes, written at disk speed.

`weightstream synth --preset qwen3-30b-a3b OUT.gguf` writes a file that llama.cpp's loader and
ours accept as the named model: same architecture, metadata keys, tensor names, shapes and
(llama.cpp-style Q2_K) types, so expert streaming and I/O can be measured at full size without
downloading the real weights. The weights are random; only their scale is chosen:

- quantized tensors are random bytes, block for block, with each block's fp16 `d` (and `dmin`)
  overwritten so that the dequantized weights have mean ~0 and std ~1/sqrt(in_features) (see
  RandomBlocks); activations then stay O(1) through any number of layers;
- types: routed experts Q2_K (--experts-type), attention and linear attention Q4_K (--attn-type),
  the shared expert Q4_K, token_embd Q4_K and output Q6_K (llama.cpp's Q2_K recipe keeps the output
  in Q6_K);
- F32, as llama.cpp keeps them: norms (ones), q/k biases (zeros), routers `ffn_gate_inp` and
  `ffn_gate_inp_shexp` (normal, std 1/sqrt(n_embd)); the linear-attention layers' `ssm_conv1d`
  (normal, std 1/sqrt(kernel)), `ssm_a` (A = -exp(A_log): -uniform(0.5, 8), so the state decays)
  and `ssm_dt.bias` (normal, std 0.1).

Presets: Qwen3 MoE, Mixtral and OLMoE, and the Qwen3-Next family's hybrids on their own llama.cpp
architectures (qwen35moe: Qwen3.5-397B-A17B, Qwen3.5-35B-A3B; qwen3next: Qwen3-Next-80B-A3B), with
Gated DeltaNet linear-attention layers and gated attention every 4th layer (a --layers slice keeps
that pattern). Both the engine and llama.cpp run them.

The hyperparameters are written through weightstream.engine.tools.convert's write_hparams from a Hugging Face-style
config (Preset.hf_config), so the keys are those llama.cpp's converter writes for the architecture
(plus attention.key_length/value_length always, and expert_weights_norm where a preset differs from
its architecture's default); tensor names come from weightstream.engine.tools.convert's name tables. The tokenizer
is the demo model's (SmolLM2, GPT-2-style BPE), resized to the preset's vocabulary: padded with
UNUSED tokens `<|synth_pad_{i}|>`, or truncated (Mixtral's 32000 < 49152: merges that would
produce a dropped token are dropped with it), so token_embd and output keep the real model's shapes.

Each tensor's bytes depend only on (seed, tensor name), so layer 0 is the same whatever --layers.
Data is generated and written in ~64 MiB chunks (never a whole tensor in memory) under a
temporary name beside the output, fsync'ed, then renamed into place; a failed or interrupted write
leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from ...kernels import formats

from . import convert
from .assets import cache_dir, demo_model_path
from ..formats.atomic import gguf_output
from ..formats.gguf_file import GGUFFile
from ..model.config import ARCHITECTURES as ENGINE_ARCHITECTURES

CHUNK_BYTES = 64 << 20  # generate-and-write unit: large enough for full-speed writes, small in memory
PAD_TOKEN = "<|synth_pad_{}|>"
PRESET_KEY = "weightstream.synth.preset"
SEED_KEY = "weightstream.synth.seed"


# ----------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class LinearAttention:
    """A hybrid preset's Gated DeltaNet layers (the Qwen3-Next family): all but every
    `full_attention_interval`-th layer."""

    n_k_heads: int  # linear_num_key_heads
    n_v_heads: int  # linear_num_value_heads
    head_dim: int  # key and value heads alike (llama.cpp's loader sizes both from ssm.state_size)
    conv_kernel: int = 4
    full_attention_interval: int = 4
    partial_rotary_factor: float = 0.25  # the (gated) attention layers rotate this fraction of head_dim

    def layer_types(self, n_layer: int) -> list[str]:
        """The first n_layer layers' types, as transformers derives them from the interval."""
        return ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(n_layer)]


@dataclass(frozen=True)
class Preset:
    """One real model's shapes. `hf_arch` names the weightstream.engine.tools.convert.ARCHITECTURES entry (the
    Hugging Face architecture) whose llama.cpp conventions the file follows."""

    name: str
    arch: str  # llama.cpp architecture (general.architecture)
    hf_arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # one routed expert's FFN width
    n_vocab: int
    n_ff: int  # the config's intermediate_size (dense width; unused by MoE layers, but written; 0: none)
    rope_base: float
    rms_eps: float
    n_ctx: int
    norm_topk: bool  # top-k routing weights renormalised to sum 1
    n_ff_shexp: int = 0  # shared expert FFN width (qwen2moe, the Qwen3-Next family)
    linear: LinearAttention | None = None  # the Qwen3-Next family's linear-attention layers

    def hf_config(self, n_layer: int | None = None) -> dict[str, Any]:
        """The preset as the Hugging Face config.json weightstream.engine.tools.convert reads (Dims, write_hparams)."""
        spec = convert.ARCHITECTURES[self.hf_arch]
        n_layer = self.n_layer if n_layer is None else n_layer
        hp: dict[str, Any] = {
            "architectures": [self.hf_arch],
            "num_hidden_layers": n_layer,
            "max_position_embeddings": self.n_ctx,
            "hidden_size": self.n_embd,
            "intermediate_size": self.n_ff or None,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": self.head_dim,  # always: llama.cpp then reads attention.key_length/value_length
            "rope_theta": self.rope_base,
            "rms_norm_eps": self.rms_eps,
            "num_experts": self.n_expert,
            "num_experts_per_tok": self.n_expert_used,
            "vocab_size": self.n_vocab,
        }
        hp[spec.expert_ff_key] = self.n_ff_exp  # Mixtral and OLMoE: intermediate_size is the expert width
        if self.n_ff_shexp:
            hp["shared_expert_intermediate_size"] = self.n_ff_shexp
        if self.linear is not None:
            hp.update(self.linear_config(n_layer, spec))
        return {k: v for k, v in hp.items() if v is not None}

    def linear_config(self, n_layer: int, spec: convert.ArchSpec) -> dict[str, Any]:
        """The Qwen3-Next family's config entries: linear attention, layer types (a slice keeps the
        full model's pattern: 4 layers are 3 linear + 1 attention), transformers 5's rope_parameters."""
        la = self.linear
        rope = {"rope_type": "default", "rope_theta": self.rope_base, "partial_rotary_factor": la.partial_rotary_factor}
        if spec.mrope:
            rope["mrope_section"] = [11, 11, 10]  # Qwen3.5's
        return {
            "linear_num_key_heads": la.n_k_heads, "linear_num_value_heads": la.n_v_heads,
            "linear_key_head_dim": la.head_dim, "linear_value_head_dim": la.head_dim,
            "linear_conv_kernel_dim": la.conv_kernel, "full_attention_interval": la.full_attention_interval,
            "layer_types": la.layer_types(n_layer), "rope_parameters": rope,
        }


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Qwen/Qwen3-30B-A3B config.json
    Preset("qwen3-30b-a3b", "qwen3moe", "Qwen3MoeForCausalLM", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
           head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=151936, n_ff=6144,
           rope_base=1e6, rms_eps=1e-6, n_ctx=40960, norm_topk=True),
    # Qwen/Qwen3-235B-A22B config.json
    Preset("qwen3-235b-a22b", "qwen3moe", "Qwen3MoeForCausalLM", n_layer=94, n_embd=4096, n_head=64, n_head_kv=4,
           head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=1536, n_vocab=151936, n_ff=12288,
           rope_base=1e6, rms_eps=1e-6, n_ctx=40960, norm_topk=True),
    # mistralai/Mixtral-8x7B-v0.1: llama.cpp runs Mixtral as `llama` with experts
    Preset("mixtral-8x7b", "llama", "MixtralForCausalLM", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
           head_dim=128, n_expert=8, n_expert_used=2, n_ff_exp=14336, n_vocab=32000, n_ff=14336,
           rope_base=1e6, rms_eps=1e-5, n_ctx=32768, norm_topk=True),
    # allenai/OLMoE-1B-7B-0924
    Preset("olmoe-1b-7b", "olmoe", "OlmoeForCausalLM", n_layer=16, n_embd=2048, n_head=16, n_head_kv=16,
           head_dim=128, n_expert=64, n_expert_used=8, n_ff_exp=1024, n_vocab=50304, n_ff=1024,
           rope_base=10000.0, rms_eps=1e-5, n_ctx=4096, norm_topk=False),
    # The Qwen3-Next family: hybrid layers, 3 of every 4 linear attention (Gated DeltaNet: 16 key
    # heads, value heads of the same size, short convolution of 4) and every 4th gated attention
    # (query and output gate per head, rope over a quarter of head_dim); every layer's FFN is the MoE
    # block with one sigmoid-gated shared expert. Shapes: transformers 5.25's Qwen3_5MoeTextConfig
    # and Qwen3NextConfig (whose defaults are Qwen/Qwen3.5-35B-A3B's and Qwen/Qwen3-Next-80B-A3B's);
    # layer counts as llama.cpp's loaders name them (src/models/qwen35moe.cpp: 40 layers = 35B_A3B,
    # 60 = 397B_A17B; qwen3next.cpp: 48 = 80B_A3B). rope_theta 1e7, context 262144 and Qwen3-Next's
    # intermediate_size 5120 (written, unused) are the published config.json's (transformers'
    # defaults: 1e4, 32768, 5632); rms eps 1e-6 both; Qwen3.5's mrope_section [11, 11, 10] is
    # transformers' and llama.cpp's default. The 397B is no transformers default: its figures are its
    # published config.json's, as public copies quote it (not checked against the hub itself).
    # Qwen/Qwen3.5-397B-A17B (text model): 32 query / 2 KV heads of 256, 16 key / 64 value heads of
    # 128, 512 experts 4096 <-> 1024 top-10, shared expert 1024, vocabulary 248320
    Preset("qwen3.5-397b-a17b", "qwen35moe", "Qwen3_5MoeForCausalLM", n_layer=60, n_embd=4096, n_head=32,
           n_head_kv=2, head_dim=256, n_expert=512, n_expert_used=10, n_ff_exp=1024, n_vocab=248320, n_ff=0,
           rope_base=1e7, rms_eps=1e-6, n_ctx=262144, norm_topk=True, n_ff_shexp=1024,
           linear=LinearAttention(n_k_heads=16, n_v_heads=64, head_dim=128)),
    # Qwen/Qwen3.5-35B-A3B (text model): 16 query / 2 KV heads of 256, 16 key / 32 value heads of
    # 128, 256 experts 2048 <-> 512 top-8, shared expert 512, vocabulary 248320
    Preset("qwen3.5-35b-a3b", "qwen35moe", "Qwen3_5MoeForCausalLM", n_layer=40, n_embd=2048, n_head=16,
           n_head_kv=2, head_dim=256, n_expert=256, n_expert_used=8, n_ff_exp=512, n_vocab=248320, n_ff=0,
           rope_base=1e7, rms_eps=1e-6, n_ctx=262144, norm_topk=True, n_ff_shexp=512,
           linear=LinearAttention(n_k_heads=16, n_v_heads=32, head_dim=128)),
    # Qwen/Qwen3-Next-80B-A3B: 16 query / 2 KV heads of 256, 16 key / 32 value heads of 128, 512
    # experts 2048 <-> 512 top-10, shared expert 512, vocabulary 151936 (norm_topk_prob true)
    Preset("qwen3-next-80b-a3b", "qwen3next", "Qwen3NextForCausalLM", n_layer=48, n_embd=2048, n_head=16,
           n_head_kv=2, head_dim=256, n_expert=512, n_expert_used=10, n_ff_exp=512, n_vocab=151936, n_ff=5120,
           rope_base=1e7, rms_eps=1e-6, n_ctx=262144, norm_topk=True, n_ff_shexp=512,
           linear=LinearAttention(n_k_heads=16, n_v_heads=32, head_dim=128)),
)}


def resolve_preset(preset: str | Preset, arch: str | None = None) -> Preset:
    """The Preset named `preset`; with `arch`, also check that it is the preset's architecture."""
    if isinstance(preset, Preset):
        p = preset
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    if arch is not None and arch != p.arch:
        raise ValueError(f"--arch {arch} does not match preset {p.name}, whose architecture is {p.arch}")
    return p


# ----------------------------------------------------------------------------------------------
# the tensor plan


class PlannedTensor(NamedTuple):
    """One tensor of the file, planned before any data is written."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # NumPy order (outermost first); GGUF's ne[] is the reverse

    @property
    def nbytes(self) -> int:
        return formats.row_bytes(self.qtype, self.shape[-1]) * int(np.prod(self.shape[:-1], dtype=np.int64))


QUANT_TYPES = {"q2_k": QT.Q2_K, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K}
FILE_TYPES = {QT.Q2_K: LlamaFileType.MOSTLY_Q2_K, QT.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
              QT.Q6_K: LlamaFileType.MOSTLY_Q6_K}  # general.file_type, named after the routed experts' type
SHARED_EXPERT_TYPE = QT.Q4_K
TOKEN_EMBD_TYPE = QT.Q4_K
OUTPUT_TYPE = QT.Q6_K


def quant_type(name: str) -> QT:
    """--experts-type / --attn-type value ("q2_k") -> the type."""
    try:
        return QUANT_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unsupported type {name!r}; supported: {', '.join(QUANT_TYPES)}") from None


def check_layers(p: Preset, layers: int | None) -> int:
    if layers is None:
        return p.n_layer
    if not 1 <= layers <= p.n_layer:
        raise ValueError(f"--layers must be between 1 and {p.n_layer} for {p.name}, got {layers}")
    return layers


def plan(preset: str | Preset, layers: int | None = None, attn_type: str = "q4_k",
         experts_type: str = "q2_k") -> list[PlannedTensor]:
    """Every tensor of the file, in file order (weightstream.engine.tools.convert's order), with its type and NumPy
    shape: what llama.cpp's loader expects for the preset's architecture."""
    p = resolve_preset(preset)
    spec = convert.ARCHITECTURES[p.hf_arch]
    d = convert.Dims.from_hparams(spec, p.hf_config(check_layers(p, layers)))
    shapes = layer_shapes(spec, d)
    types = {"attn": quant_type(attn_type), "experts": quant_type(experts_type)}

    def planned(name: str, shape: tuple[int, ...]) -> PlannedTensor:
        # convert.tensor_type keeps 1-D tensors, norms, biases, routers and ssm_conv1d in F32, as llama.cpp does
        return PlannedTensor(name, convert.tensor_type(name, shape, role_type(name, types)), shape)

    tensors = [planned("token_embd.weight", (d.n_vocab, d.n_embd))]
    for i in range(d.n_layer):
        tensors += [planned(f"blk.{i}.{n}", shapes[n]) for n in layer_names(spec, d, i)]
    tensors += [planned("output_norm.weight", (d.n_embd,)), planned("output.weight", (d.n_vocab, d.n_embd))]
    return tensors


def layer_shapes(spec: convert.ArchSpec, d: convert.Dims) -> dict[str, tuple[int, ...]]:
    """Per-layer GGUF name -> NumPy shape."""
    q_rows, kv_rows = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    shapes = {
        "attn_norm.weight": (d.n_embd,), "ffn_norm.weight": (d.n_embd,), "post_attention_norm.weight": (d.n_embd,),
        # the Qwen3-Next family's attention projects query and output gate per head
        "attn_q.weight": (2 * q_rows if spec.linear_attn else q_rows, d.n_embd), "attn_k.weight": (kv_rows, d.n_embd),
        "attn_v.weight": (kv_rows, d.n_embd), "attn_output.weight": (d.n_embd, q_rows),
        "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
        "attn_q_norm.weight": (d.head_dim,) if spec.qk_norm == "head" else (q_rows,),
        "attn_k_norm.weight": (d.head_dim,) if spec.qk_norm == "head" else (kv_rows,),
        "ffn_gate_inp.weight": (d.n_expert, d.n_embd),
        "ffn_gate_exps.weight": (d.n_expert, d.n_ff_exp, d.n_embd),
        "ffn_up_exps.weight": (d.n_expert, d.n_ff_exp, d.n_embd),
        "ffn_down_exps.weight": (d.n_expert, d.n_embd, d.n_ff_exp),
        "ffn_gate_inp_shexp.weight": (1, d.n_embd),  # as Qwen2MoeModel writes it; llama.cpp reads {n_embd}
        "ffn_gate_shexp.weight": (d.n_ff_shexp, d.n_embd), "ffn_up_shexp.weight": (d.n_ff_shexp, d.n_embd),
        "ffn_down_shexp.weight": (d.n_embd, d.n_ff_shexp),
    }
    if d.linear is not None:  # as convert.plan_linear_attention writes them
        la = d.linear
        shapes.update({
            "attn_qkv.weight": (la.conv_channels, d.n_embd), "attn_gate.weight": (la.v_rows, d.n_embd),
            "ssm_beta.weight": (la.n_v_heads, d.n_embd), "ssm_alpha.weight": (la.n_v_heads, d.n_embd),
            "ssm_ba.weight": (2 * la.n_v_heads, d.n_embd),
            "ssm_conv1d.weight": (la.conv_channels, la.conv_kernel), "ssm_dt.bias": (la.n_v_heads,),
            "ssm_a": (la.n_v_heads,), "ssm_norm.weight": (la.v_dim,), "ssm_out.weight": (d.n_embd, la.v_rows),
        })
    return shapes


def layer_names(spec: convert.ArchSpec, d: convert.Dims, i: int) -> list[str]:
    """Layer i's GGUF tensors (after "blk.N."), in weightstream.engine.tools.convert's order."""
    if spec.linear_attn:  # norm, linear or gated attention, norm
        attention = [n for n in convert.ATTENTION.values() if n != "attn_norm.weight"] + [*convert.QK_NORM.values()]
        mixer = convert.linear_attention_gguf_names(spec) if d.recurrent[i] else attention
        names = ["attn_norm.weight", *mixer, *convert.HYBRID_POST_ATTENTION_NORM.values()]
    else:
        names = [*convert.ATTENTION.values(), *(convert.QKV_BIAS.values() if spec.qkv_bias else ()),
                 *(convert.QK_NORM.values() if spec.qk_norm else ()), *convert.FFN_NORM.values()]
    return [*names, "ffn_gate_inp.weight", *convert.EXPERT_GGUF,
            *(convert.SHARED_EXPERT.values() if spec.shared_expert else ())]


def role_type(name: str, types: dict[str, QT]) -> QT:
    """The quantized type a weight matrix gets by its role (convert.tensor_type then keeps norms,
    biases and routers in F32 whatever this says)."""
    if "_exps." in name:
        return types["experts"]
    if "_shexp." in name:
        return SHARED_EXPERT_TYPE
    if ".attn_" in name or ".ssm_" in name:  # attention and linear attention alike
        return types["attn"]
    return TOKEN_EMBD_TYPE if name.startswith("token_embd") else OUTPUT_TYPE


# ----------------------------------------------------------------------------------------------
# tensor contents


@dataclass(frozen=True)
class RandomBlocks:
    """Random k-quant blocks whose dequantized weights have a chosen std.

    With random bytes every scale, min and quant is uniform on its range, so w = d*sc*q - dmin*m
    has, for d = 1, a fixed std (`unit_std`); d = std / unit_std then gives the std wanted, and
    dmin = `dmin_per_d` * d makes the mean zero (d*E[sc]*E[q] = dmin*E[m]). Derivations:
    - Q2_K: sc, m ~ U{0..15} (4-bit), q ~ U{0..3}. E[sc q] = 7.5*1.5 = 11.25 = dmin/d * 7.5, so
      dmin = 1.5 d. Var = Var(sc q) + 1.5^2 Var(m) = (77.5*3.5 - 11.25^2) + 2.25*21.25 = 192.5.
    - Q4_K: sc, m ~ U{0..63} (6-bit), q ~ U{0..15}. dmin = 7.5 d.
      Var = (1333.5*77.5 - 236.25^2) + 7.5^2 * 341.25 = 66727.5.
    - Q6_K: w = d*sc*(q - 32), sc ~ U{-128..127} (int8), q ~ U{0..63}; no dmin, mean d/4 ~ 0.
      E[w^2] = 5461.5 * 341.5 = 1865102.25.
    """

    block: np.dtype  # weightstream.kernels.formats block layout (field offsets as in ggml-common.h)
    unit_std: float
    dmin_per_d: float | None

    def d_for(self, std: float) -> tuple[np.float16, np.float16 | None]:
        d = np.float16(std / self.unit_std)
        if d == 0:
            raise ValueError(f"weight std {std} underflows fp16 d")
        return d, (np.float16(float(d) * self.dmin_per_d) if self.dmin_per_d is not None else None)

    def generate(self, bits: np.random.BitGenerator, n_blocks: int, std: float) -> np.ndarray:
        """uint8[n_blocks * block bytes]: random blocks with d (and dmin) set for `std`."""
        n_bytes = n_blocks * self.block.itemsize
        raw = bits.random_raw(-(-n_bytes // 8)).view(np.uint8)[:n_bytes]  # the fastest numpy random source
        blocks = raw.view(self.block)  # [n_blocks] structured view: d/dmin are strided fields
        d, dmin = self.d_for(std)
        blocks["d"] = d
        if dmin is not None:
            blocks["dmin"] = dmin
        return raw


RANDOM_BLOCKS = {
    QT.Q2_K: RandomBlocks(formats.BLOCK_Q2_K, unit_std=float(np.sqrt(192.5)), dmin_per_d=1.5),
    QT.Q4_K: RandomBlocks(formats.BLOCK_Q4_K, unit_std=float(np.sqrt(66727.5)), dmin_per_d=7.5),
    QT.Q6_K: RandomBlocks(formats.BLOCK_Q6_K, unit_std=float(np.sqrt(1865102.25)), dmin_per_d=None),
}


def weight_std(t: PlannedTensor) -> float:
    """1/sqrt(in_features): keeps y = W x at the scale of x."""
    return 1.0 / float(np.sqrt(t.shape[-1]))


def tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    """A tensor's bytes depend on the seed and its name only (not on --layers or file order)."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode())])


def tensor_chunks(t: PlannedTensor, seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The tensor's bytes, in chunks of at most ~chunk_bytes (whole blocks)."""
    bits = np.random.SFC64(tensor_seed(seed, t.name))
    if t.qtype == QT.F32:
        yield f32_values(t, bits).view(np.uint8).reshape(-1)
        return
    scheme = RANDOM_BLOCKS[t.qtype]
    n_blocks = t.nbytes // scheme.block.itemsize
    # a multiple of 8 blocks is a whole number of 64-bit draws: the stream does not depend on chunking
    per_chunk = max(8, chunk_bytes // scheme.block.itemsize // 8 * 8)
    for start in range(0, n_blocks, per_chunk):
        yield scheme.generate(bits, min(per_chunk, n_blocks - start), weight_std(t))


def f32_values(t: PlannedTensor, bits: np.random.BitGenerator) -> np.ndarray:
    """Norms are ones, biases zeros; routers and the short convolution normal with std
    1/sqrt(in_features) (router logits ~1); the linear attention's A = -exp(A_log) negative, so
    that its state decays (-uniform(0.5, 8)), and its dt bias small."""
    rng = np.random.Generator(bits)
    if t.name.endswith("_norm.weight"):
        return np.ones(t.shape, np.float32)
    if t.name.endswith(".ssm_a"):
        return -rng.uniform(0.5, 8.0, t.shape).astype(np.float32)
    if t.name.endswith(".ssm_dt.bias"):
        return (0.1 * rng.standard_normal(t.shape, np.float32)).astype(np.float32)
    if t.name.endswith(".bias"):
        return np.zeros(t.shape, np.float32)
    if t.name.endswith((*convert.ROUTERS, ".ssm_conv1d.weight")):
        return (rng.standard_normal(t.shape, np.float32) * weight_std(t)).astype(np.float32)
    raise ValueError(f"no F32 contents defined for {t.name}")


# ----------------------------------------------------------------------------------------------
# tokenizer


def fit_vocab(tokens: list[str], types: list[int], merges: list[str], n_vocab: int
              ) -> tuple[list[str], list[int], list[str]]:
    """The vocabulary resized to n_vocab tokens: padded with UNUSED `<|synth_pad_{i}|>` tokens, or
    truncated, dropping the merges whose parts or result are no longer tokens (a BPE merge must
    produce a token of the vocabulary)."""
    if n_vocab >= len(tokens):
        pad = range(len(tokens), n_vocab)
        return (tokens + [PAD_TOKEN.format(i) for i in pad], types + [int(gguf.TokenType.UNUSED)] * len(pad),
                merges)
    kept = set(tokens[:n_vocab])

    def merge_kept(merge: str) -> bool:
        left, _, right = merge.partition(" ")
        return left in kept and right in kept and left + right in kept

    return tokens[:n_vocab], types[:n_vocab], [m for m in merges if merge_kept(m)]


def write_tokenizer(w: gguf.GGUFWriter, source: dict[str, Any], n_vocab: int) -> None:
    """The source model's tokenizer.* keys, with the vocabulary resized to n_vocab."""
    K = gguf.Keys.Tokenizer
    tokens, types, merges = fit_vocab(list(source[K.LIST]), list(source[K.TOKEN_TYPE]),
                                      list(source.get(K.MERGES, [])), n_vocab)
    w.add_tokenizer_model(source[K.MODEL])
    if K.PRE in source:
        w.add_tokenizer_pre(source[K.PRE])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if K.SCORES in source:  # SentencePiece vocabularies: pad tokens score 0
        w.add_token_scores((list(source[K.SCORES]) + [0.0] * n_vocab)[:n_vocab])
    if merges:
        w.add_token_merges(merges)
    token_ids = ((K.BOS_ID, w.add_bos_token_id), (K.EOS_ID, w.add_eos_token_id), (K.UNK_ID, w.add_unk_token_id),
                 (K.PAD_ID, w.add_pad_token_id))
    for key, add in token_ids:
        if key in source and int(source[key]) < n_vocab:
            add(int(source[key]))
    for key, add in ((K.ADD_BOS, w.add_add_bos_token), (K.ADD_EOS, w.add_add_eos_token),
                     (K.ADD_PREFIX, w.add_add_space_prefix)):
        if key in source:
            add(bool(source[key]))
    if K.CHAT_TEMPLATE in source:
        w.add_chat_template(source[K.CHAT_TEMPLATE])


def demo_tokenizer() -> dict[str, Any]:
    """The demo model's (SmolLM2's) tokenizer.* metadata."""
    with GGUFFile(demo_model_path(quiet=True)) as f:
        return {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}


# ----------------------------------------------------------------------------------------------
# writing


def write_metadata(w: gguf.GGUFWriter, p: Preset, n_layer: int, experts_type: QT, seed: int,
                   tokenizer: dict[str, Any]) -> None:
    """All key/value pairs, in the order llama.cpp's converter writes them. Expects the tensor
    infos in the writer (for the size label)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"synth {p.name}" + (f" ({n_layer} of {p.n_layer} layers)" if n_layer < p.n_layer else ""))
    w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
    convert.write_hparams(w, convert.ARCHITECTURES[p.hf_arch], p.hf_config(n_layer), FILE_TYPES[experts_type])
    # only where the architecture's default differs (llama.cpp's qwen35moe and qwen3next, which the
    # engine does not know, always renormalise and write no such key)
    engine_flags = ENGINE_ARCHITECTURES.get(p.arch)
    if engine_flags is not None and p.norm_topk != engine_flags.moe_norm_topk:
        w.add_expert_weights_norm(p.norm_topk)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(w, tokenizer, p.n_vocab)
    w.add_string(PRESET_KEY, p.name)
    w.add_uint64(SEED_KEY, seed)


def write_chunk(f, chunk: np.ndarray) -> None:
    """The one place tensor data reaches the file."""
    f.write(memoryview(chunk))


def synth_model(out_path: str | os.PathLike, preset: str | Preset, layers: int | None = None,
                attn_type: str = "q4_k", seed: int = 0, progress: bool = True, *, experts_type: str = "q2_k",
                arch: str | None = None) -> Path:
    """Write a synthetic GGUF of `preset` (a PRESETS name) to out_path: its first `layers` layers
    (default all), routed experts in experts_type, attention in attn_type, weights from `seed`.
    Returns the path. `arch`, if given, must be the preset's architecture."""
    p = resolve_preset(preset, arch)
    n_layer = check_layers(p, layers)
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_path.parent} does not exist")
    tensors = plan(p, n_layer, attn_type, experts_type)
    tokenizer = demo_tokenizer()

    with gguf_output(out_path, p.arch) as (writer, tmp_path):
        for t in tensors:  # infos first: GGUF's header lists every tensor before any data
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        write_metadata(writer, p, n_layer, quant_type(experts_type), seed, tokenizer)
        writer.write_header_to_file(tmp_path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        write_tensor_data(writer, tensors, seed, progress, out_path.name)
    return out_path


def write_tensor_data(writer: gguf.GGUFWriter, tensors: list[PlannedTensor], seed: int, progress: bool,
                      label: str) -> None:
    """Stream every tensor's bytes into the open file, aligned and padded exactly as
    GGUFWriter.write_tensors_to_file does (data section and each tensor at general.alignment).
    gguf_output fsyncs the file before its rename (engine/formats/atomic.py)."""
    from tqdm import tqdm

    f = writer.fout[0]
    writer.write_padding(f, f.tell())
    total = sum(writer.ggml_pad(t.nbytes, writer.data_alignment) for t in tensors)
    with (tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress) as bar,
          closing(prefetched(data_section(tensors, seed, writer.data_alignment))) as chunks):
        for chunk in chunks:
            write_chunk(f, chunk)
            bar.update(chunk.nbytes)


def data_section(tensors: list[PlannedTensor], seed: int, alignment: int) -> Iterator[np.ndarray]:
    """The bytes after the tensor infos: each tensor's chunks, then zeros up to the alignment."""
    for t in tensors:
        yield from tensor_chunks(t, seed)
        yield np.zeros(gguf.GGUFWriter.ggml_pad(t.nbytes, alignment) - t.nbytes, np.uint8)


def prefetched(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """chunks, each generated in a thread while the caller writes the one before: generating
    (~1 GB/s) and writing (disk speed) overlap instead of adding up. On an error on either side
    the pending chunk is finished and dropped."""
    with ThreadPoolExecutor(1, thread_name_prefix="synth") as pool:
        pending = pool.submit(next, chunks, None)
        # no timeout: the thread computes one chunk (bounded CPU work, no I/O), and the wait is
        # interruptible by signals (SIGTERM during a synth: engine/formats/atomic.py)
        while (chunk := pending.result()) is not None:
            pending = pool.submit(next, chunks, None)
            yield chunk


# ----------------------------------------------------------------------------------------------
# command line


# `weightstream demo --moe`: a synthetic MoE with OLMoE-1B-7B's exact shapes (16 layers, 64
# experts of 2048<->1024, top-8; random Q2_K experts), written once into the cache.
DEMO_MOE_PRESET = "olmoe-1b-7b"
DEMO_MOE_FILENAME = "olmoe-1b-7b-synth-Q2_K.gguf"


def demo_moe_path(cache: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Path of the synthetic demo MoE, writing it (~2.3 GB, seconds at disk speed) on first use.
    A cached file is reused if it is the preset's (synth writes to a temporary name and renames
    only a complete file, so a present file is whole)."""
    target = cache_dir(cache) / DEMO_MOE_FILENAME
    if target.exists():
        try:
            with GGUFFile(target) as f:
                if f.metadata.get(PRESET_KEY) == DEMO_MOE_PRESET:
                    return target
        except (OSError, ValueError):  # unreadable (GGUFError is a ValueError): written again below
            pass
    if not quiet:
        print(f"weightstream: writing the synthetic MoE demo model ({DEMO_MOE_PRESET} shapes) to {target} ...",
              file=sys.stderr)
    return synth_model(target, DEMO_MOE_PRESET, progress=not quiet)
