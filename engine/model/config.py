"""ModelConfig: every hyperparameter the forward pass needs, built in one place from GGUF metadata.

Architecture differences are a few flags (rope style, q/k norms, biases, expert gating, shared
expert, gated attention, hybrid layers), following llama.cpp's conventions for each architecture,
not separate model classes. Hybrid architectures (qwen35, qwen35moe, qwen3next) name each layer's
token mixer in `layer_types`: Gated DeltaNet linear attention (LINEAR_ATTENTION) with full
attention every `full_attention_interval`-th layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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
    # qwen35/qwen3next: attn_q packs each head's [query; output gate]; the attention output is
    # multiplied by sigmoid(gate) before attn_output
    gated_attention: bool = False
    # Gated DeltaNet layers beside full attention (layer_types from full_attention_interval or
    # attention.recurrent_layers); the FFN norm is named post_attention_norm
    hybrid: bool = False
    # which K head a linear-attention V head reads: llama.cpp's qwen35 converter reorders V heads so
    # V head j uses K head j % n_k_heads ("tiled"); qwen3next keeps Hugging Face's j // (Hv / Hk)
    linear_v_tiled: bool = True


# Per-architecture conventions, as llama.cpp's graph builders (src/models/*.cpp) apply them.
ARCHITECTURES: dict[str, ArchFlags] = {
    "llama": ArchFlags(rope=ROPE_NORM, moe_norm_topk=True),  # dense, or Mixtral-style MoE
    "qwen2": ArchFlags(rope=ROPE_NEOX, qkv_bias=True),
    "qwen3": ArchFlags(rope=ROPE_NEOX, qk_norm="head"),
    "qwen2moe": ArchFlags(rope=ROPE_NEOX, qkv_bias=True, shared_expert=True, requires_moe=True),
    "qwen3moe": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, requires_moe=True),
    "olmoe": ArchFlags(rope=ROPE_NEOX, qk_norm="full", requires_moe=True),
    # the Qwen3.5 family: text positions make its multi-section rope plain NEOX on n_rot dims
    "qwen35": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                        gated_attention=True, hybrid=True),
    "qwen35moe": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                           requires_moe=True, gated_attention=True, hybrid=True),
    "qwen3next": ArchFlags(rope=ROPE_NEOX, qk_norm="head", moe_norm_topk=True, shared_expert=True,
                           requires_moe=True, gated_attention=True, hybrid=True, linear_v_tiled=False),
}


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
        n_layer_all = int(key("block_count"))
        # an MTP (next-token prediction) block is counted in block_count: it is not run here
        n_nextn = int(key("nextn_predict_layers", 0, required=False))
        if not 0 <= n_nextn < n_layer_all:
            raise ConfigError(f"{source}: {arch}.nextn_predict_layers {n_nextn} for block_count {n_layer_all}")
        n_layer = n_layer_all - n_nextn

        def per_layer(name, default):
            """A key that may be one value or one per block (llama.cpp's get_key_or_arr): the
            trunk's layers must agree, since every layer here shares one width."""
            value = key(name, default, required=False)
            if not isinstance(value, list):
                return int(value)
            values = {int(v) for v in value[:n_layer]}
            if len(value) != n_layer_all or len(values) != 1:
                raise ConfigError(f"{source}: {arch}.{name} per layer {value[:8]}... is not supported "
                                  f"(one value for all {n_layer} layers is)")
            return values.pop()

        n_expert = int(key("expert_count", 0, required=False))
        if flags.requires_moe and n_expert == 0:
            raise ConfigError(f"{source}: architecture {arch} needs {arch}.expert_count")
        n_ff = per_layer("feed_forward_length", 0)
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
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=int(key("rope.dimension_count", head_dim, required=False)),
            rope_base=float(key("rope.freq_base", 10000.0, required=False)),
            rope_freq_scale=1.0 / scale_factor if scale_factor else 1.0,
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            n_ff=int(n_ff),
            n_expert=n_expert,
            n_expert_used=per_layer("expert_used_count", 0),
            n_ff_exp=per_layer("expert_feed_forward_length", 0),
            n_ff_shexp=int(key("expert_shared_feed_forward_length", 0, required=False)),
            flags=flags,
            **(_hybrid_layers(arch, key, n_layer, source) if flags.hybrid else {}),
        )


def _hybrid_layers(arch: str, key, n_layer: int, source: str) -> dict[str, Any]:
    """layer_types and the Gated DeltaNet sizes of a hybrid, as llama.cpp's qwen35/qwen3next
    loaders read them: attention.recurrent_layers (one bool per block) where present, else every
    full_attention_interval-th layer (default 4) is full attention."""
    recurrent = key("attention.recurrent_layers", None, required=False)
    if recurrent is not None:
        if not isinstance(recurrent, list) or len(recurrent) < n_layer:
            raise ConfigError(f"{source}: {arch}.attention.recurrent_layers must hold one bool per layer "
                              f"({n_layer}), got {recurrent!r:.80}")
        is_linear = [bool(r) for r in recurrent[:n_layer]]
    else:
        interval = int(key("full_attention_interval", 4, required=False))
        if interval < 1:
            raise ConfigError(f"{source}: {arch}.full_attention_interval must be >= 1, got {interval}")
        is_linear = [(i + 1) % interval != 0 for i in range(n_layer)]
    dims = LinearAttentionDims(
        conv_kernel=int(key("ssm.conv_kernel")),
        n_k_heads=int(key("ssm.group_count")),
        n_v_heads=int(key("ssm.time_step_rank")),
        k_head_dim=int(key("ssm.state_size")),
        v_head_dim=0,
    )
    inner = int(key("ssm.inner_size"))
    if min(dims.conv_kernel, dims.n_k_heads, dims.n_v_heads, dims.k_head_dim) < 1 or inner % dims.n_v_heads:
        raise ConfigError(f"{source}: {arch}.ssm.* sizes are not usable: conv_kernel {dims.conv_kernel}, group_count "
                          f"{dims.n_k_heads}, time_step_rank {dims.n_v_heads}, state_size {dims.k_head_dim}, "
                          f"inner_size {inner}")
    if dims.n_v_heads % dims.n_k_heads:
        raise ConfigError(f"{source}: {arch}.ssm.time_step_rank {dims.n_v_heads} (value heads) is not a multiple "
                          f"of ssm.group_count {dims.n_k_heads} (key heads)")
    dims = replace(dims, v_head_dim=inner // dims.n_v_heads)
    return {"layer_types": tuple(LINEAR_ATTENTION if lin else ATTENTION for lin in is_linear), "linear": dims}
