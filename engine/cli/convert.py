"""`weightstream convert`, `quantize` and `imatrix`: writing GGUF files (engine/tools/ does the work)."""
from __future__ import annotations

import argparse
import time

from .parser import model_path, positive_int


def register(sub) -> None:
    from ..tools import recipes

    p = sub.add_parser("convert", help="write GGUF from a Hugging Face safetensors directory")
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=list(dict.fromkeys(["f32", "f16", "bf16", "q8_0", *recipes.RECIPES])),
                   help="f32/f16/bf16/q8_0: every matrix in that type; q*_k: a llama.cpp-like recipe (fallbacks listed at the end)")
    p.add_argument("--imatrix", default=None, help="importance matrix for the q*_k recipes, from weightstream imatrix (default: none)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="requantize a GGUF with a recipe (q2_k, q3_k_m, q4_k_m, q8_0)")
    p.add_argument("input", type=model_path, help="input GGUF (any type we read)")
    p.add_argument("output", help="output GGUF")
    p.add_argument("type", help=f"recipe: {', '.join(recipes.RECIPES)}")
    p.add_argument("--imatrix", default=None, help="importance matrix, from weightstream imatrix or llama-imatrix (default: none)")
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="dequantize threads (default: available cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("imatrix", help="collect an importance matrix over a calibration text")
    p.add_argument("model", type=model_path, help="path to a GGUF file")
    p.add_argument("-f", "--file", required=True, help="calibration text (not the evaluation text)")
    p.add_argument("-o", "--output", default="imatrix.dat", help="the importance matrix file to write")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=512, help="tokens per chunk (llama-imatrix -c)")
    p.add_argument("--chunks", type=positive_int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="kernel threads (default: available cores)")
    p.add_argument("--memory-budget", default=None, help="stream experts (or FFNs) under this budget (default: none, everything resident)")
    p.add_argument("--process-output", action="store_true", help="collect output.weight too")
    p.set_defaults(func=cmd_imatrix)


def cmd_convert(args) -> int:
    from ..tools.convert import convert_hf_to_gguf

    out = convert_hf_to_gguf(args.hf_dir, args.out, args.type, progress=True, imatrix=args.imatrix)
    print(f"wrote {out}")
    _print_types(out, args.type)
    return 0


def _print_types(path, ftype: str) -> None:
    """Bits per weight per type, and the tensors that fell back from the recipe's type and why."""
    from ..tools.type_summary import format_type_summary, type_summary

    print(format_type_summary(type_summary(path, ftype), ftype))


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..tools import recipes
    from ..tools.quantize import quantize_gguf

    t0 = time.perf_counter()
    recipes.get_recipe(args.type)  # a clear error before anything is opened
    path = quantize_gguf(args.input, args.output, args.type, args.imatrix, progress=not args.quiet,
                         threads=args.threads)
    seconds = time.perf_counter() - t0
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB ({args.type}) in {seconds:.1f} s")
    _print_types(path, args.type)
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from ..runtime.engine import Engine
    from ..tools.imatrix import collect_imatrix, save_imatrix

    with open(args.file, encoding="utf-8") as fh:
        text = fh.read()
    opts = {"n_ctx": args.ctx_size}
    if args.memory_budget:  # streams what does not fit (Engine.load's stream="auto")
        opts.update(memory_budget=args.memory_budget)
    t0 = time.perf_counter()
    with Engine.load(args.model, threads=args.threads, **opts) as engine:
        collector, chunks = collect_imatrix(engine, text, args.ctx_size, args.chunks, args.process_output,
                                            progress=True)
    path = save_imatrix(args.output, collector, args.ctx_size, chunks, dataset=args.file)
    print(f"{path}: {len(collector.stats)} entries from {chunks} chunks of {args.ctx_size} tokens "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
