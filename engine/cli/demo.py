"""`weightstream demo` (the demo model under a budget smaller than it) and `weightstream synth`
(synthetic models at real models' shapes, for streaming tests and benchmarks)."""
from __future__ import annotations

import argparse
import sys
import time

from .options import print_speed
from .parser import count, positive_int

DEMO_PROMPT = "Explain in three sentences why the sky is blue."
DEMO_BUDGET = "92MiB"  # below the demo model's 98 MB (93.8 MiB) file, metadata and tokenizer counted: its FFNs stream
DEMO_MOE_BUDGET = "640MiB"  # the synthetic MoE demo model is ~2.3 GB: 3.5x this


def register(sub) -> None:
    p = sub.add_parser("demo", help="fetch the demo model (SmolLM2-135M-Instruct Q4_1) and generate")
    p.add_argument("-p", "--prompt", default=DEMO_PROMPT, help="the question asked")
    p.add_argument("-n", "--n-predict", type=count, default=96, help="tokens to generate")
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="kernel threads (default: available cores)")
    p.add_argument("--cache-dir", default=None, help="where the model is cached (default: $WEIGHTSTREAM_CACHE or ~/.cache/weightstream)")
    p.add_argument("--memory-budget", default=None,
                   help=f"run under this budget, streaming what does not fit (default {DEMO_BUDGET}, or "
                        f"{DEMO_MOE_BUDGET} with --moe: less than the model; 'none': everything resident)")
    p.add_argument("--moe", action="store_true",
                   help="a synthetic MoE with OLMoE-1B-7B's shapes (~2.3 GB, written once into the cache), "
                        "3.5x the budget: its experts stream")
    p.set_defaults(func=cmd_demo)
    register_synth(sub)


def cmd_demo(args) -> int:
    from ..runtime.engine import Engine
    from ..tools.assets import demo_model_path
    from ..tools.synth import demo_moe_path
    from ..observe.report import format_summary

    path = demo_moe_path(args.cache_dir) if args.moe else demo_model_path(args.cache_dir)
    budget = args.memory_budget or (DEMO_MOE_BUDGET if args.moe else DEMO_BUDGET)
    streaming = budget != "none"
    opts = dict(memory_budget=budget, stream="auto", prefetch="lookahead", profile=True, progress=True) \
        if streaming else {}
    with Engine.load(path, threads=args.threads, **opts) as engine:
        print(f"model: {path.name} ({engine.config.arch}, {engine.config.n_layer} layers, "
              f"{path.stat().st_size / 1e6:.0f} MB), loaded in {engine.load_s:.2f} s", file=sys.stderr)
        print(f"> {args.prompt}")
        if args.moe:  # random weights: the text is noise; the point is running 3.5x past the budget
            print("(synthetic MoE with random weights: the text means nothing; watch the figures)", file=sys.stderr)
            pieces = engine.stream(args.prompt, args.n_predict)
        else:
            pieces = engine.chat([{"role": "user", "content": args.prompt}], args.n_predict, stream=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        print_speed(engine)
        if streaming:
            print(format_summary(engine.profile_summary(with_sweep=False)), file=sys.stderr)
    return 0


def register_synth(sub) -> None:
    from ..tools.synth import PRESETS, QUANT_TYPES

    p = sub.add_parser("synth", help="write a synthetic MoE GGUF with a real model's tensor shapes")
    p.add_argument("out", help="output GGUF path")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--arch", default=None, help="the preset's llama.cpp architecture, checked against it (default: the preset's)")
    p.add_argument("--layers", type=positive_int, default=None, help="write only the first N layers (default: all)")
    p.add_argument("--experts-type", default="q2_k", choices=sorted(QUANT_TYPES), help="routed experts' type")
    p.add_argument("--attn-type", default="q4_k", choices=sorted(QUANT_TYPES), help="attention matrices' type")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..tools.synth import synth_model

    t0 = time.perf_counter()
    path = synth_model(args.out, args.preset, args.layers, args.attn_type, args.seed, progress=not args.quiet,
                       experts_type=args.experts_type, arch=args.arch)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"{path}: {size / 2**30:.2f} GiB in {seconds:.1f} s ({size / seconds / 1e6:.0f} MB/s)")
    return 0
