"""`weightstream info`, `perplexity` and `profile`: what a model file holds, how well it predicts a
text, and what the expert streamer did while it generated."""
from __future__ import annotations

import json
import sys

from .parser import model_path
from .options import add_model_options, add_sampling_options, load_engine, print_speed, sampling_options


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, bytes per type, experts")
    p.add_argument("model", type=model_path, help="path to a GGUF file")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity computes it")
    add_model_options(p)
    p.add_argument("-f", "--file", required=True, help="the text to score (UTF-8)")
    p.set_defaults(func=cmd_perplexity)  # -c is the chunk size, as in llama-perplexity

    p = sub.add_parser("profile", help="generate with the prefetch profiler on: hit rates, stalls, bytes, plots")
    add_model_options(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    add_sampling_options(p)
    p.add_argument("--trace", default=None, help="write a Chrome trace JSON here (opens in Perfetto; default: none)")
    p.add_argument("--plot", default=None, help="write PNGs: token timeline (+ .hit_layers.png, .hit_cache.png; default: none)")
    p.add_argument("--json", default=None, help="write every figure as JSON here (default: none)")
    p.add_argument("--disk-gbps", type=float, default=None, help="the disk's bandwidth in GB/s, from weightstream bench io (default: unknown)")
    p.add_argument("--measure-disk", action="store_true", help="measure it first with cold reads of the model file")
    p.set_defaults(func=cmd_profile, n_predict=32)


def cmd_info(args) -> int:
    from ..formats.gguf_file import GGUFFile
    from ..tools.info import format_info, model_info

    with GGUFFile(args.model) as f:
        info = model_info(f)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def cmd_perplexity(args) -> int:
    with open(args.file, encoding="utf-8") as fh:
        text = fh.read()
    with load_engine(args) as engine:
        def progress(chunk: int, ppl: float) -> None:  # llama-perplexity's running figure: [1]12.3456,[2]...
            print(f"[{chunk}]{ppl:.4f},", end="", file=sys.stderr, flush=True)

        engine.perplexity(text, args.ctx, progress=progress)
        s = engine.stats()
    p = s["perplexity"]
    print(f"\n{p['chunks']} chunks of {p['n_ctx']} tokens ({p['scored']} scored) at {s['prefill_tok_s']:.1f} tok/s",
          file=sys.stderr)
    print(f"PPL = {p['ppl']:.4f} +/- {p['ppl_err']:.5f}")
    return 0


def cmd_profile(args) -> int:
    from ..observe.report import format_summary, write_report

    disk = args.disk_gbps
    if disk is None and args.measure_disk:
        from ..stream.disk import disk_bandwidth

        disk = disk_bandwidth(args.model, threads=max(1, args.io_threads), n_reads=200)["bytes_per_s"] / 1e9
        print(f"disk: {disk:.2f} GB/s (cold parallel preads of expert-sized chunks of the model file)", file=sys.stderr)
    with load_engine(args, profile=True) as engine:
        for piece in engine.stream(args.prompt, args.n_predict, **sampling_options(args)):
            print(piece, end="", flush=True)
        print()
        print_speed(engine)
        summary = engine.profile_summary(disk)
        written = write_report(engine.profiler, summary, args.plot, args.trace, args.json)
    print(format_summary(summary))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
