"""What a GGUF model holds: architecture, parameters, bytes per tensor type, experts."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..model.config import LINEAR_ATTENTION, ModelConfig
from ..formats.gguf_file import GGUFFile

EXPERT_SUFFIXES = ("_exps.weight",)


def model_info(f: GGUFFile) -> dict:
    cfg = ModelConfig.from_metadata(f.metadata, source=str(f.path))
    by_type: dict[str, int] = defaultdict(int)
    params = expert_bytes = expert_params = 0
    for t in f.tensors.values():
        n = int(np.prod(t.shape))
        params += n
        by_type[t.qtype.name] += t.nbytes
        if t.name.endswith(EXPERT_SUFFIXES):
            expert_bytes += t.nbytes
            expert_params += n
    total_bytes = sum(by_type.values())
    n_moe_layers = sum(1 for name in f.tensors if name.endswith("ffn_gate_exps.weight"))
    per_expert = expert_bytes // (n_moe_layers * cfg.n_expert) if n_moe_layers else 0
    return {
        "path": str(f.path), "shards": len(f.paths), "architecture": cfg.arch, "name": cfg.name,
        "parameters": params, "tensors": len(f.tensors), "bytes": total_bytes,
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim, "n_vocab": cfg.n_vocab, "context_length": cfg.n_ctx_train,
        "n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used, "moe_layers": n_moe_layers,
        "expert_parameters": expert_params,
        "bytes_per_expert": per_expert,  # gate + up + down slices of one expert in one layer
        "expert_bytes": expert_bytes, "resident_bytes": total_bytes - expert_bytes,
        **_linear_attention_info(cfg),
    }


def _linear_attention_info(cfg: ModelConfig) -> dict:
    """Hybrids: how many layers are Gated DeltaNet and their sizes."""
    d = cfg.linear
    if d is None:
        return {}
    return {"linear_attention_layers": sum(t == LINEAR_ATTENTION for t in cfg.layer_types),
            "linear_heads": f"{d.n_k_heads} k / {d.n_v_heads} v x {d.k_head_dim}/{d.v_head_dim}",
            "conv_kernel": d.conv_kernel}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def format_info(info: dict) -> str:
    lines = [
        f"file          {info['path']}" + (f" ({info['shards']} shards)" if info["shards"] > 1 else ""),
        f"architecture  {info['architecture']}  ({info['name']})",
        f"parameters    {info['parameters'] / 1e6:,.1f} M in {info['tensors']} tensors, {_size(info['bytes'])}",
        f"shape         {info['n_layer']} layers, n_embd {info['n_embd']}, heads {info['n_head']}/{info['n_head_kv']} kv "
        f"x {info['head_dim']}, vocab {info['n_vocab']}, context {info['context_length']}",
        "bytes by type " + ", ".join(f"{k} {_size(v)}" for k, v in info["bytes_by_type"].items()),
    ]
    if info["n_expert"]:
        lines.append(f"experts       {info['n_expert']} per layer, {info['n_expert_used']} used per token, "
                     f"{info['moe_layers']} MoE layers, {_size(info['bytes_per_expert'])} per expert")
    if "linear_attention_layers" in info:
        lines.append(f"hybrid        {info['linear_attention_layers']} Gated DeltaNet layers (heads "
                     f"{info['linear_heads']}, conv {info['conv_kernel']}), "
                     f"{info['n_layer'] - info['linear_attention_layers']} full attention")
    lines.append(f"resident      {_size(info['resident_bytes'])}; experts {_size(info['expert_bytes'])}")
    return "\n".join(lines)
