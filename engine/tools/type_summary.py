"""What `quantize` and `convert` wrote, for the summary they print: bytes and bits per weight per
tensor type, and which tensors fell back from the type their recipe wanted, and why.

The k-quants pack 256 weights of a row into a block, so a matrix whose rows are not a multiple of
256 wide cannot be stored in them: llama.cpp's tensor_type_fallback gives it a 32-element type
instead (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, ...; F16 if 32 does not divide either). For a model
whose hidden size is such a width (SmolLM2-135M: 576) that is most of the matrices, and the file
comes out at more bits per weight than the recipe's name says; the summary says so."""
from __future__ import annotations

import re
from collections import defaultdict

import gguf
import numpy as np

from ..formats.gguf_file import GGUFFile
from . import recipes

QT = gguf.GGMLQuantizationType


def _wanted(ftype: str, name: str, shape: tuple[int, ...], model, tied: bool) -> QT | None:
    """The type the recipe (or convert's --type) asks for before any fallback; None: kept as is
    (norms, biases, routers: F32 by name, not a fallback)."""
    if ftype in recipes.RECIPES:
        recipe = recipes.get_recipe(ftype)
        return recipes._preferred(recipe, name, shape, model, tied) if recipes.quantizable(name, shape) else None
    from .convert import OUT_TYPES, tensor_type

    weight_type = OUT_TYPES[ftype][1]
    return weight_type if tensor_type(name, shape, QT.F32) != QT.F32 or weight_type == QT.F32 else None


def type_summary(path, ftype: str) -> dict:
    """{"types": {TYPE: {"tensors", "params", "bytes"}}, "params", "bytes", "bpw" (bits per weight
    over every tensor, as llama.cpp's "model size ... BPW"), "fallbacks": [{"wanted", "got",
    "cols", "block", "tensors": [names], "params"}]} for the GGUF written at path with ftype."""
    with GGUFFile(path) as f:
        model = recipes.ModelShape.from_metadata(f.metadata)
        tied = "output.weight" not in f.tensors
        types = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
        falls = defaultdict(list)
        for name, info in f.tensors.items():
            shape = tuple(int(d) for d in info.shape)
            params = int(np.prod(shape, dtype=np.int64))
            t = types[info.qtype.name]
            t["tensors"] += 1
            t["params"] += params
            t["bytes"] += info.nbytes
            wanted = _wanted(ftype, name, shape, model, tied)
            if wanted is not None and wanted != info.qtype and shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
                falls[(wanted.name, info.qtype.name, shape[-1], gguf.GGML_QUANT_SIZES[wanted][0])].append((name, params))
    params, nbytes = sum(t["params"] for t in types.values()), sum(t["bytes"] for t in types.values())
    return {"types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])), "params": params, "bytes": nbytes,
            "bpw": 8 * nbytes / params if params else 0.0,
            "fallbacks": [{"wanted": w, "got": g, "cols": c, "block": b, "tensors": [n for n, _ in fell],
                           "params": sum(p for _, p in fell)}
                          for (w, g, c, b), fell in sorted(falls.items(), key=lambda kv: -len(kv[1]))]}


def _patterns(names: list[str], limit: int = 8) -> str:
    """blk.0.attn_q.weight, blk.1.attn_q.weight, ... -> "blk.*.attn_q.weight" (the kinds of tensor)."""
    kinds = list(dict.fromkeys(re.sub(r"^blk\.\d+\.", "blk.*.", n) for n in names))
    return ", ".join(kinds[:limit]) + (f", ... ({len(kinds) - limit} more kinds)" if len(kinds) > limit else "")


def format_type_summary(s: dict, ftype: str) -> str:
    """Lines for the terminal: one per type, then the fallbacks with their reason, then the size."""
    lines = []
    for name, t in s["types"].items():
        lines.append(f"  {name:6} {t['tensors']:5} tensors {t['params'] / 1e6:9.2f} M weights "
                     f"{t['bytes'] / 2**20:9.2f} MiB  {8 * t['bytes'] / t['params']:5.2f} bits/weight")
    for fb in s["fallbacks"]:
        lines.append(f"  fell back {fb['wanted']} -> {fb['got']}: {len(fb['tensors'])} tensors "
                     f"({_patterns(fb['tensors'])}): rows of {fb['cols']} weights do not divide {fb['wanted']}'s "
                     f"{fb['block']}-weight blocks")
    note = ""
    if s["fallbacks"]:
        share = sum(fb["params"] for fb in s["fallbacks"])
        note = f"; {share / s['params']:.0%} of the weights in fallback types" if s["params"] else ""
    lines.append(f"  {ftype}: {s['params'] / 1e6:.2f} M weights in {s['bytes'] / 2**20:.2f} MiB = "
                 f"{s['bpw']:.2f} bits per weight{note}")
    return "\n".join(lines)
