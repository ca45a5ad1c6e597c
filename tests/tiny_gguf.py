"""Tiny GGUF models written directly with gguf.GGUFWriter, for tests of the reader and loader
that should not depend on our converter. Random F32 weights, llama.cpp names and shapes."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER, N_VOCAB = 64, 4, 2, 128, 2, 256
HEAD_DIM = N_EMBD // N_HEAD


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """name -> float32 array in NumPy shape order (rows, cols)."""
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": rng.normal(0, 0.5, (N_VOCAB, N_EMBD)),
         "output_norm.weight": 1 + rng.normal(0, 0.1, N_EMBD),
         "output.weight": rng.normal(0, 0.2, (N_VOCAB, N_EMBD))}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + rng.normal(0, 0.1, N_EMBD)
        t[p + "attn_q.weight"] = rng.normal(0, 0.2, (N_HEAD * HEAD_DIM, N_EMBD))
        t[p + "attn_k.weight"] = rng.normal(0, 0.2, (N_HEAD_KV * HEAD_DIM, N_EMBD))
        t[p + "attn_v.weight"] = rng.normal(0, 0.2, (N_HEAD_KV * HEAD_DIM, N_EMBD))
        t[p + "attn_output.weight"] = rng.normal(0, 0.2, (N_EMBD, N_HEAD * HEAD_DIM))
        t[p + "ffn_norm.weight"] = 1 + rng.normal(0, 0.1, N_EMBD)
        t[p + "ffn_gate.weight"] = rng.normal(0, 0.2, (N_FF, N_EMBD))
        t[p + "ffn_up.weight"] = rng.normal(0, 0.2, (N_FF, N_EMBD))
        t[p + "ffn_down.weight"] = rng.normal(0, 0.2, (N_EMBD, N_FF))
    return {k: v.astype(np.float32) for k, v in t.items()}


def tiny_llama_metadata(arch: str = "llama") -> dict:
    tokens = [f"<t{i}>" for i in range(N_VOCAB)]
    return {
        f"{arch}.context_length": 128, f"{arch}.embedding_length": N_EMBD, f"{arch}.block_count": N_LAYER,
        f"{arch}.feed_forward_length": N_FF, f"{arch}.attention.head_count": N_HEAD,
        f"{arch}.attention.head_count_kv": N_HEAD_KV, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.dimension_count": HEAD_DIM,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * N_VOCAB, "tokenizer.ggml.merges": [],
    }


N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 2, 32


def tiny_moe_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """tiny_llama_tensors with each dense FFN replaced by a router and N_EXPERT stacked experts
    (Mixtral's layout: ffn_{gate,up,down}_exps as [n_expert, rows, cols])."""
    rng = np.random.default_rng(seed + 1)
    t = tiny_llama_tensors(seed)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        for k in ("ffn_gate", "ffn_up", "ffn_down"):
            del t[p + k + ".weight"]
        t[p + "ffn_gate_inp.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_EMBD)).astype(np.float32)
        t[p + "ffn_gate_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_FF_EXP, N_EMBD)).astype(np.float32)
        t[p + "ffn_up_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_FF_EXP, N_EMBD)).astype(np.float32)
        t[p + "ffn_down_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_EMBD, N_FF_EXP)).astype(np.float32)
    return t


def tiny_moe_metadata(arch: str = "llama") -> dict:
    return {**tiny_llama_metadata(arch), f"{arch}.expert_count": N_EXPERT,
            f"{arch}.expert_used_count": N_EXPERT_USED, f"{arch}.expert_feed_forward_length": N_FF_EXP}


def write_gguf(path: Path, tensors: dict[str, np.ndarray], metadata: dict, arch: str = "llama",
               raw_types: dict[str, gguf.GGMLQuantizationType] | None = None, split_max_tensors: int = 0,
               alignment: int | None = None) -> Path:
    """Write tensors (float32 arrays, or uint8 block bytes for names in raw_types) and metadata;
    alignment: a general.alignment other than the default 32 (the data laid out to it)."""
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value in metadata.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, arr in tensors.items():
        if raw_types and name in raw_types:
            w.add_tensor(name, arr, raw_dtype=raw_types[name])
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rewritten_gguf(src: Path, dst: Path, edit_tensors=None, keys: dict | None = None) -> Path:
    """The GGUF at src written to dst with every tensor expanded to F32 by gguf's own dequantizer
    (F32 tensors unchanged), passed through edit_tensors({name: float32 array in NumPy order} ->
    the same; None: as they are), and the metadata entries in keys replaced (an entry the file
    lacks is given as (value, GGUFValueType, sub type))."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    keys = dict(keys or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = keys.pop(key, f.contents())
        w.add_key_value(key, value, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for key, (value, vtype, sub) in keys.items():
        w.add_key_value(key, value, vtype, sub)
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape.tolist()))).astype(np.float32) for t in r.tensors}
    for name, arr in (edit_tensors(tensors) if edit_tensors else tensors).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def patched_gguf(src: Path, dst: Path, edits=(), cut: int | None = None, extra: bytes = b"") -> Path:
    """A copy of src with bytes overwritten: edits are (offset, struct format, value) packed
    little-endian at offset, or (offset, bytes); cut: keep only the first `cut` bytes; extra:
    appended. For crafting invalid files at the places gguf_header.read_layout reports."""
    import struct

    data = bytearray(Path(src).read_bytes())
    for offset, fmt, *value in edits:
        raw = fmt if isinstance(fmt, (bytes, bytearray)) else struct.pack("<" + fmt, *value)
        data[offset:offset + len(raw)] = raw
    Path(dst).write_bytes(bytes(data[:cut]) + extra)
    return Path(dst)
