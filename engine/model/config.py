"""ModelConfig: every hyperparameter the forward pass needs, built in one place from GGUF metadata.

Architecture differences are a few flags (rope style, q/k norms, biases, expert gating, shared
expert, gated attention, hybrid layers), following llama.cpp's conventions for each architecture,
not separate model classes. Hybrid architectures (qwen35, qwen35moe, qwen3next) name each layer's
token mixer in `layer_types`: Gated DeltaNet linear attention (LINEAR_ATTENTION) with full
attention every `full_attention_interval`-th layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from ...kernels.reference.ops import ROPE_NEOX, ROPE_NORM  # the rope styles (kernels' Rope takes them)
from ..errors import ConfigError



@dataclass(frozen=True)
class ArchFlags:
    rope: str
    qk_norm: str | None = None  # "head": per-head RMSNorm [head_dim] (qwen3); "full": over the whole projection (olmoe)
    qkv_bias: bool = False
    moe_norm_topk: bool = False  # renormalise the top-k softmax weights to sum 1
    shared_expert: bool = False  # qwen2moe: sigmoid-gated shared expert beside the routed ones
    requires_moe: bool = False
    # qwen35/qwen3next: attn_q packs each head's [query; output gate]; the attention output is
    # multiplied by sigmoid(gate) before attn_output
    gated_attention: bool = False
    # Gated DeltaNet layers beside full attention (layer_types from full_attention_interval or
    # attention.recurrent_layers); the FFN norm is named post_attention_norm
    hybrid: bool = False
    # which K head a linear-attention V head reads: llama.cpp's qwen35 converter reorders V heads so
    # V head j uses K head j % n_k_heads ("tiled"); qwen3next keeps Hugging Face's j // (Hv / Hk)
    linear_v_tiled: bool = True
    # a file without output.weight multiplies by token_embd (tied embeddings); llama.cpp's
    # load_tensors allows that for most architectures but requires output.weight for qwen2moe and
    # olmoe (created with flags 0, no TENSOR_DUPLICATED fallback)
    tied_output: bool = True


# Per-architecture conventions, as llama.cpp's graph builders (src/models/*.cpp) apply them.
ARCHITECTURES: dict[str, ArchFlags] = {
    "llama": ArchFlags(rope=ROPE_NORM, moe_norm_topk=True),  # dense, or Mixtral-style MoE
    "qwen2": ArchFlags(rope=ROPE_NEOX, qkv_bias=True),
    "qwen3": ArchFlags(rope=ROPE_NEOX, qk_norm="head"),
    "qwen2moe": ArchFlags(rope=ROPE_NEOX, qkv_bias=True, shared_expert=True, requires_moe=True,
                          tied_output=False),
    "qwen3moe": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, requires_moe=True),
    "olmoe": ArchFlags(rope=ROPE_NEOX, qk_norm="full", requires_moe=True, tied_output=False),
    # the Qwen3.5 family: text positions make its multi-section rope plain NEOX on n_rot dims
    "qwen35": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                        gated_attention=True, hybrid=True),
    "qwen35moe": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                           requires_moe=True, gated_attention=True, hybrid=True),
    "qwen3next": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                           requires_moe=True, gated_attention=True, hybrid=True, linear_v_tiled=False),
}


# llama.cpp's limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS in llama-hparams.h): per-layer and
# per-expert lists are sized by these counts, so a block_count of 2**40 must not get that far
MAX_LAYERS = 512
MAX_EXPERTS = 512

ATTENTION = "attention"  # a layer type: softmax attention over the layer's KV cache
LINEAR_ATTENTION = "linear_attention"  # a layer type: Gated DeltaNet with a fixed-size recurrent state


@dataclass(frozen=True)
class LinearAttentionDims:
    """Gated DeltaNet sizes (llama.cpp's ssm.* keys): n_k_heads query/key heads of k_head_dim and
    n_v_heads value heads of v_head_dim (a multiple of n_k_heads), conv_kernel taps."""

    conv_kernel: int  # ssm.conv_kernel
    n_k_heads: int  # ssm.group_count
    n_v_heads: int  # ssm.time_step_rank
    k_head_dim: int  # ssm.state_size
    v_head_dim: int  # ssm.inner_size / n_v_heads

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: q, k and v side by side."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/value length per head
    n_rot: int  # rotated dimensions per head (== head_dim unless partial rope)
    rope_base: float
    rope_freq_scale: float  # linear rope scaling: positions are multiplied by this (1.0: none)
    rms_eps: float
    n_ff: int  # dense FFN width (0 for all-MoE models)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # routed expert FFN width
    n_ff_shexp: int  # shared expert FFN width (0: none)
    flags: ArchFlags
    # each layer's token mixer, by layer index: ATTENTION (softmax attention over a KV cache) for
    # every layer of the architectures supported so far; hybrids mix in recurrent kinds
    layer_types: tuple[str, ...] = ()
    linear: LinearAttentionDims | None = None  # hybrids' Gated DeltaNet sizes
    n_nextn: int = 0  # MTP blocks after the n_layer trunk blocks (in block_count; not run here)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (ATTENTION,) * self.n_layer)
        if len(self.layer_types) != self.n_layer:
            raise ConfigError(f"{self.name or self.arch}: {len(self.layer_types)} layer types for {self.n_layer} layers")
        if LINEAR_ATTENTION in self.layer_types and self.linear is None:
            raise ConfigError(f"{self.name or self.arch}: linear-attention layers without their ssm.* sizes")

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def with_experts_per_token(self, k: int | None) -> "ModelConfig":
        """This config routing each token to its top k experts instead of the file's count (None:
        unchanged). The weights of the k are renormalised over the k where the architecture
        renormalises (as llama.cpp's --override-kv of expert_used_count does)."""
        if k is None:
            return self
        if not self.is_moe:
            raise ConfigError(f"{self.name or self.arch}: experts_per_token={k}, but the model has no experts")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_expert:
            raise ConfigError(f"{self.name or self.arch}: experts_per_token must be an integer in "
                              f"1..{self.n_expert} (the expert count), got {k!r}")
        return replace(self, n_expert_used=k)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> "ModelConfig":
        """The config of a GGUF's metadata, every value checked (type, range, consistency) before
        anything divides by it or sizes a buffer with it: a bad value is a ConfigError naming
        source, the key, what was expected and what was found."""
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {arch!r:.80} "
                              f"(supported: {', '.join(ARCHITECTURES)})")
        flags = ARCHITECTURES[arch]
        k = MetadataKeys(meta, arch, source)

        n_embd = k.int("embedding_length", minimum=1)
        n_head = k.int("attention.head_count", minimum=1)
        n_head_kv = k.int("attention.head_count_kv", n_head, minimum=1)
        if n_head % n_head_kv:
            k.fail("attention.head_count_kv", f"a divisor of head_count {n_head}", n_head_kv)
        if k.has("attention.key_length"):
            head_dim = k.int("attention.key_length", minimum=1)
        elif n_embd % n_head:  # the head size comes from the split of the embedding
            k.fail("embedding_length", f"a multiple of head_count {n_head} (no attention.key_length given)", n_embd)
        else:
            head_dim = n_embd // n_head
        value_len = k.int("attention.value_length", head_dim, minimum=1)
        if value_len != head_dim:
            k.fail("attention.value_length", f"key_length {head_dim} (other lengths are not supported)", value_len)
        n_rot = k.int("rope.dimension_count", head_dim, minimum=2)
        if n_rot > head_dim or n_rot % 2:
            k.fail("rope.dimension_count", f"an even count <= the head size {head_dim}", n_rot)
        scaling = k.str("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            k.fail("rope.scaling.type", "'none' or 'linear' (others are not supported)", scaling)
        # llama.cpp reads a factor of 0 as "not set" (scale 1); a negative or non-finite one is garbage
        scale_factor = k.float("rope.scaling.factor", 1.0, minimum=0.0) if scaling == "linear" else 1.0
        n_layer_all = k.int("block_count", minimum=1, maximum=MAX_LAYERS)
        # an MTP (next-token prediction) block is counted in block_count: it is not run here
        n_nextn = k.int("nextn_predict_layers", 0, minimum=0)
        if n_nextn >= n_layer_all:
            k.fail("nextn_predict_layers", f"fewer than block_count {n_layer_all}", n_nextn)
        n_layer = n_layer_all - n_nextn

        def per_layer(name, default):
            """A key that may be one value or one per block (llama.cpp's get_key_or_arr): the
            trunk's layers must agree, since every layer here shares one width."""
            value = k.get(name, default)
            if not isinstance(value, list):
                return k.int(name, default, minimum=0)
            if len(value) != n_layer_all or any(not _is_int(v) or v < 0 for v in value):
                k.fail(name, f"one count >= 0 per block ({n_layer_all})", value)
            values = set(value[:n_layer])
            if len(values) != 1:
                raise ConfigError(f"{source}: {arch}.{name} per layer {value[:8]}... is not supported "
                                  f"(one value for all {n_layer} layers is)")
            return values.pop()

        n_expert = k.int("expert_count", 0, minimum=0, maximum=MAX_EXPERTS)
        if flags.requires_moe and n_expert == 0:
            k.fail("expert_count", f"at least 1 (architecture {arch} is a mixture of experts)", k.get("expert_count"))
        n_expert_used = per_layer("expert_used_count", 0)
        if n_expert and not 1 <= n_expert_used <= n_expert:
            k.fail("expert_used_count", f"an integer in 1..{n_expert} (expert_count)", n_expert_used)
        if not n_expert and n_expert_used:
            k.fail("expert_used_count", "0 or absent (expert_count is 0: no experts)", n_expert_used)
        n_ff = per_layer("feed_forward_length", 0)
        norm_topk = k.bool("expert_weights_norm", flags.moe_norm_topk)
        if norm_topk != flags.moe_norm_topk:
            flags = ArchFlags(**{**flags.__dict__, "moe_norm_topk": norm_topk})
        # the model's vocabulary (token_embd's rows) is the tokenizer's token count: llama.cpp sizes
        # token_embd by it (vocab.n_tokens()) and refuses any other row count, larger or smaller;
        # a larger one here would sample ids the tokenizer cannot decode, mid-generation
        tokens = meta.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens) if isinstance(tokens, list) and tokens else None
        if k.has("vocab_size") or n_tokens is None:
            n_vocab = k.int("vocab_size", minimum=1)
            if n_tokens is not None and n_vocab != n_tokens:
                k.fail("vocab_size", f"the tokenizer's token count {n_tokens} (tokenizer.ggml.tokens)", n_vocab)
        else:
            n_vocab = n_tokens
        return cls(
            arch=arch,
            name=str(meta.get("general.name", "")),
            n_vocab=n_vocab,
            n_ctx_train=k.int("context_length", 4096, minimum=1),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_base=k.float("rope.freq_base", 10000.0, minimum=0.0, exclusive=True),
            rope_freq_scale=1.0 / scale_factor if scale_factor else 1.0,
            rms_eps=k.float("attention.layer_norm_rms_epsilon", None, minimum=0.0, exclusive=True),
            n_ff=n_ff,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=per_layer("expert_feed_forward_length", 0),
            n_ff_shexp=k.int("expert_shared_feed_forward_length", 0, minimum=0),
            flags=flags,
            n_nextn=n_nextn,
            **(_hybrid_layers(k, n_layer) if flags.hybrid else {}),
        )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class MetadataKeys:
    """Typed reads of one architecture's `{arch}.*` metadata keys. Each refuses a value of the
    wrong type (an array or string for a count, a bool or float for an int, NaN or inf for a
    float) or out of range with a ConfigError naming the file, the key, expected and found: a
    GGUF's metadata comes from strangers, and a 0 or NaN here would otherwise surface as a
    ZeroDivisionError at load or as NaN logits mid-generation."""

    def __init__(self, meta: Mapping[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def fail(self, name: str, expected: str, found: Any):
        raise ConfigError(f"{self.source}: metadata {self.arch}.{name}: expected {expected}, found {found!r:.80}")

    def has(self, name: str) -> bool:
        return f"{self.arch}.{name}" in self.meta

    def get(self, name: str, default: Any = None) -> Any:
        """The raw value; a required key (default None) that is missing is an error naming it."""
        full = f"{self.arch}.{name}"
        if full in self.meta:
            return self.meta[full]
        if default is None:
            raise ConfigError(f"{self.source}: missing metadata key {full}")
        return default

    def int(self, name: str, default: int | None = None, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.get(name, default)
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            self.fail(name, f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}",
                      value)
        return int(value)

    def float(self, name: str, default: float | None = None, minimum: float = 0.0, exclusive: bool = False) -> float:
        value = self.get(name, default)
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if not ok or not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            self.fail(name, f"a finite number {'>' if exclusive else '>='} {minimum:g}", value)
        return float(value)

    def str(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            self.fail(name, "a string", value)
        return value

    def bool(self, name: str, default: bool | None = None) -> bool:
        value = self.get(name, default)
        if not isinstance(value, (bool, np.bool_)):
            self.fail(name, "a bool", value)
        return bool(value)


def _hybrid_layers(k: MetadataKeys, n_layer: int) -> dict[str, Any]:
    """layer_types and the Gated DeltaNet sizes of a hybrid, as llama.cpp's qwen35/qwen3next
    loaders read them: attention.recurrent_layers (one bool per block) where present, else every
    full_attention_interval-th layer (default 4) is full attention."""
    if k.has("attention.recurrent_layers"):
        recurrent = k.get("attention.recurrent_layers")
        if not isinstance(recurrent, list) or len(recurrent) < n_layer or \
                any(not isinstance(r, (bool, np.bool_)) for r in recurrent):
            k.fail("attention.recurrent_layers", f"one bool per layer ({n_layer})", recurrent)
        is_linear = [bool(r) for r in recurrent[:n_layer]]
    else:
        interval = k.int("full_attention_interval", 4, minimum=1)
        is_linear = [(i + 1) % interval != 0 for i in range(n_layer)]
    dims = LinearAttentionDims(
        conv_kernel=k.int("ssm.conv_kernel", minimum=1),
        n_k_heads=k.int("ssm.group_count", minimum=1),
        n_v_heads=k.int("ssm.time_step_rank", minimum=1),
        k_head_dim=k.int("ssm.state_size", minimum=1),
        v_head_dim=0,
    )
    inner = k.int("ssm.inner_size", minimum=1)
    if inner % dims.n_v_heads:
        k.fail("ssm.inner_size", f"a multiple of ssm.time_step_rank {dims.n_v_heads} (value heads)", inner)
    if dims.n_v_heads % dims.n_k_heads:
        k.fail("ssm.time_step_rank", f"a multiple of ssm.group_count {dims.n_k_heads} (key heads)", dims.n_v_heads)
    dims = replace(dims, v_head_dim=inner // dims.n_v_heads)
    return {"layer_types": tuple(LINEAR_ATTENTION if lin else ATTENTION for lin in is_linear), "linear": dims}
