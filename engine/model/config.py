"""ModelConfig: every hyperparameter the forward pass needs, built in one place from GGUF metadata.

Architecture differences are a few flags (rope style, q/k norms, biases, expert gating, shared
expert), following llama.cpp's conventions for each architecture, not separate model classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

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


# Per-architecture conventions, as llama.cpp's graph builders (src/models/*.cpp) apply them.
ARCHITECTURES: dict[str, ArchFlags] = {
    "llama": ArchFlags(rope=ROPE_NORM, moe_norm_topk=True),  # dense, or Mixtral-style MoE
    "qwen2": ArchFlags(rope=ROPE_NEOX, qkv_bias=True),
    "qwen3": ArchFlags(rope=ROPE_NEOX, qk_norm="head"),
    "qwen2moe": ArchFlags(rope=ROPE_NEOX, qkv_bias=True, shared_expert=True, requires_moe=True),
    "qwen3moe": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, requires_moe=True),
    "olmoe": ArchFlags(rope=ROPE_NEOX, qk_norm="full", requires_moe=True),
}


ATTENTION = "attention"  # a layer type: softmax attention over the layer's KV cache


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

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (ATTENTION,) * self.n_layer)
        if len(self.layer_types) != self.n_layer:
            raise ConfigError(f"{self.name or self.arch}: {len(self.layer_types)} layer types for {self.n_layer} layers")

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {arch!r} "
                              f"(supported: {', '.join(ARCHITECTURES)})")
        flags = ARCHITECTURES[arch]

        def key(name, default=None, required=True):
            full = f"{arch}.{name}"
            if full in meta:
                return meta[full]
            if required and default is None:
                raise ConfigError(f"{source}: missing metadata key {full}")
            return default

        n_embd = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        value_len = int(key("attention.value_length", head_dim))
        if value_len != head_dim:
            raise ConfigError(f"{source}: key_length {head_dim} != value_length {value_len} is not supported")
        if n_head % n_head_kv:
            raise ConfigError(f"{source}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        scaling = key("rope.scaling.type", "none", required=False)
        if scaling not in ("none", "linear"):
            raise ConfigError(f"{source}: rope scaling {scaling!r} is not supported")
        scale_factor = float(key("rope.scaling.factor", 1.0, required=False)) if scaling == "linear" else 1.0
        n_expert = int(key("expert_count", 0, required=False))
        if flags.requires_moe and n_expert == 0:
            raise ConfigError(f"{source}: architecture {arch} needs {arch}.expert_count")
        n_ff = key("feed_forward_length", 0, required=False)
        if isinstance(n_ff, list):  # per-layer widths: not used by the architectures we run
            raise ConfigError(f"{source}: per-layer feed_forward_length is not supported")
        norm_topk = key("expert_weights_norm", flags.moe_norm_topk, required=False)
        if bool(norm_topk) != flags.moe_norm_topk:
            flags = ArchFlags(**{**flags.__dict__, "moe_norm_topk": bool(norm_topk)})
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = int(key("vocab_size", len(tokens) if tokens else 0, required=False))
        return cls(
            arch=arch,
            name=str(meta.get("general.name", "")),
            n_vocab=n_vocab,
            n_ctx_train=int(key("context_length", 4096, required=False)),
            n_embd=n_embd,
            n_layer=int(key("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=int(key("rope.dimension_count", head_dim, required=False)),
            rope_base=float(key("rope.freq_base", 10000.0, required=False)),
            rope_freq_scale=1.0 / scale_factor if scale_factor else 1.0,
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            n_ff=int(n_ff),
            n_expert=n_expert,
            n_expert_used=int(key("expert_used_count", 0, required=False)),
            n_ff_exp=int(key("expert_feed_forward_length", 0, required=False)),
            n_ff_shexp=int(key("expert_shared_feed_forward_length", 0, required=False)),
            flags=flags,
        )
