"""The `weightstream` command (also `python -m weightstream`)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import WeightstreamError
from ..stream.policies import CACHE_POLICIES

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a GGUF file (any shard of a split model)")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: available cores)")
    p.add_argument("--backend", default="auto", help="auto, numpy, cython or numba (kernels/backends.py)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: min(train, 4096))")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="prompt tokens per forward pass (default 256)")
    g = p.add_argument_group("streaming (see Engine.load)")
    g.add_argument("--memory-budget", default=None,
                   help="e.g. 3GiB: resident weights + KV cache + buffers + expert cache (implies --stream auto)")
    g.add_argument("--stream", default=None, choices=["none", "experts", "ffn", "auto"],
                   help="experts: routed experts stay on disk and are read ahead of use; ffn: dense FFNs too; "
                        "auto (the default with --memory-budget): experts for a MoE, ffn for a dense model")
    g.add_argument("--cache-slots", type=int, default=None, help="experts the cache holds (default: what the budget leaves)")
    g.add_argument("--cache-policy", default="decay", choices=CACHE_POLICIES)
    g.add_argument("--prefetch", default="routing", choices=["none", "routing", "lookahead"])
    g.add_argument("--lookahead", type=int, default=None, help="experts guessed per layer (default: top-k)")
    g.add_argument("--io", default="auto", choices=["auto", "direct", "buffered"])
    g.add_argument("--io-threads", type=int, default=4)
    g.add_argument("--routing", default="model",
                   help="benchmarks only: model | trace:FILE | synthetic[:zipf=Z,reuse=R,seed=S] (engine/observe/routing.py)")
    g = p.add_argument_group("distributed: pipeline stages on Ray (engine/runtime/distributed.py; needs .[distributed])")
    g.add_argument("--ray-address", default=None, help="auto | ray://HOST:PORT (with --stages alone: a local Ray)")
    g.add_argument("--stages", type=int, default=None, help="pipeline stages, one Ray actor each")
    g.add_argument("--stage-budgets", default=None, help="per stage memory budget, e.g. 1GiB,1GiB")
    g.add_argument("--transport", default="auto", choices=["auto", "compiled", "actor"])


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def _load(args, **extra):
    from ..runtime.engine import Engine

    opts = {"n_ctx": args.ctx_size, "n_batch": args.batch_size, "routing": args.routing, **extra}
    stream = args.stream or ("auto" if args.memory_budget or args.stages or args.ray_address else "none")
    if stream != "none":
        opts.update(stream=stream, memory_budget=args.memory_budget, cache_slots=args.cache_slots,
                    cache_policy=args.cache_policy, prefetch=args.prefetch, lookahead=args.lookahead,
                    io=args.io, io_threads=args.io_threads, progress=True)
    elif args.memory_budget:
        opts.update(memory_budget=args.memory_budget)
    if args.stages or args.ray_address:
        from ..runtime.distributed import DistributedConfig

        budgets = args.stage_budgets.split(",") if args.stage_budgets else None
        opts["distributed"] = DistributedConfig(address=args.ray_address, stages=args.stages or 2, budgets=budgets,
                                                transport=args.transport)
    return Engine.load(args.model, threads=args.threads, backend=args.backend, **opts)


def _print_speed(engine) -> None:
    s = engine.stats()
    print(f"\n[{s['prompt_tokens']} prompt tokens, {s['prefill_tok_s']:.1f} tok/s prefill; "
          f"{s['generated_tokens']} generated, {s['decode_tok_s']:.1f} tok/s decode; load {s['load_s']:.2f} s]",
          file=sys.stderr)
    if "memory" in s:
        print(f"[memory: {engine.plan.describe()}]", file=sys.stderr)
    if "experts" in s:
        x = s["experts"]
        print(f"[experts: {x['slots']} cached, hit rate {x['hit_rate']:.1%} ({x['hits']} hits, {x['late']} late, "
              f"{x['misses']} misses), {x['bytes_read'] / 2**20:.1f} MiB read in {x['reads']} reads, "
              f"stalled {x['stall_s']:.2f} s; prefetch {x['prefetch']}]", file=sys.stderr)
    if "pipeline" in s:
        p = s["pipeline"]
        hop = p["latency"].get("decode", {}).get("per_hop_ms")
        print(f"[pipeline: {len(p['stages'])} stages over {p['transport']}"
              + (f", {hop:.2f} ms per hop at decode" if hop is not None else "") + "]", file=sys.stderr)
        for st in p["stages"]:
            x = st["experts"]
            print(f"[stage {st['stage']}: layers {st['layers'][0]}-{st['layers'][1] - 1} on {st['node']['ip']}, "
                  f"memory {st['memory']['total'] / 2**20:.1f} MiB, hit rate {x['hit_rate']:.1%}, "
                  f"{x['bytes_read'] / 2**20:.1f} MiB read]", file=sys.stderr)


def cmd_run(args) -> int:
    with _load(args) as engine:
        if args.chat_template:
            pieces = engine.chat([{"role": "user", "content": args.prompt}], args.n_predict, stream=True,
                                 **_sampling(args))
        else:
            pieces = engine.stream(args.prompt, args.n_predict, **_sampling(args))
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        _print_speed(engine)
    return 0


def cmd_chat(args) -> int:
    with _load(args) as engine:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        print("weightstream chat: empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            reply = []
            for piece in engine.chat(messages, args.n_predict, stream=True, **_sampling(args)):
                print(piece, end="", flush=True)
                reply.append(piece)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


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
    with _load(args) as engine:
        t0 = time.perf_counter()
        ppl = engine.perplexity(text, args.ctx)
        print(f"scored in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"PPL = {ppl:.4f}")
    return 0


def cmd_profile(args) -> int:
    from ..observe.report import format_summary, write_report

    disk = args.disk_gbps
    if disk is None and args.measure_disk:
        from ..stream.disk import disk_bandwidth

        disk = disk_bandwidth(args.model, threads=max(1, args.io_threads), n_reads=200)["bytes_per_s"] / 1e9
        print(f"disk: {disk:.2f} GB/s (cold parallel preads of expert-sized chunks of the model file)", file=sys.stderr)
    with _load(args, profile=True) as engine:
        for piece in engine.stream(args.prompt, args.n_predict, **_sampling(args)):
            print(piece, end="", flush=True)
        print()
        _print_speed(engine)
        summary = engine.profile_summary(disk)
        written = write_report(engine.profiler, summary, args.plot, args.trace, args.json)
    print(format_summary(summary))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from ..tools.convert import convert_hf_to_gguf

    out = convert_hf_to_gguf(args.hf_dir, args.out, args.type, progress=True, imatrix=args.imatrix)
    print(f"wrote {out}")
    return 0


DEMO_BUDGET = "80MiB"  # below the demo model's 98 MB file: its FFNs stream (weightstream's point)


DEMO_MOE_BUDGET = "640MiB"  # the synthetic MoE demo model is ~2.3 GB: 3.5x this


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
        _print_speed(engine)
        if streaming:
            print(format_summary(engine.profile_summary(with_sweep=False)), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightstream", description="Run GGUF language models, streaming experts from flash.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate text from a prompt")
    _add_model_options(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    _add_model_options(p)
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_chat, n_predict=512)

    p = sub.add_parser("info", help="architecture, parameters, bytes per type, experts")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity computes it")
    _add_model_options(p)
    p.add_argument("-f", "--file", required=True)
    p.set_defaults(func=cmd_perplexity)  # -c is the chunk size, as in llama-perplexity

    p = sub.add_parser("profile", help="generate with the prefetch profiler on: hit rates, stalls, bytes, plots")
    _add_model_options(p)
    p.add_argument("-p", "--prompt", required=True)
    _add_sampling_options(p)
    p.add_argument("--trace", default=None, help="Chrome trace JSON (opens in Perfetto)")
    p.add_argument("--plot", default=None, help="PNG: token timeline (+ .hit_layers.png, .hit_cache.png)")
    p.add_argument("--json", default=None, help="every figure as JSON")
    p.add_argument("--disk-gbps", type=float, default=None, help="the disk's bandwidth (weightstream bench io)")
    p.add_argument("--measure-disk", action="store_true", help="measure it first with cold reads of the model file")
    p.set_defaults(func=cmd_profile, n_predict=32)

    p = sub.add_parser("convert", help="write GGUF from a Hugging Face safetensors directory")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q2_k", "q3_k_m", "q4_k_m"])
    p.add_argument("--imatrix", default=None, help="importance matrix for the q*_k recipes (weightstream imatrix)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="fetch the demo model (SmolLM2-135M-Instruct Q4_1) and generate")
    p.add_argument("-p", "--prompt", default=DEMO_PROMPT)
    p.add_argument("-n", "--n-predict", type=int, default=96)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="where the model is cached (default ~/.cache/weightstream)")
    p.add_argument("--memory-budget", default=None,
                   help=f"run under this budget, streaming what does not fit (default {DEMO_BUDGET}, or "
                        f"{DEMO_MOE_BUDGET} with --moe: less than the model; 'none': everything resident)")
    p.add_argument("--moe", action="store_true",
                   help="a synthetic MoE with OLMoE-1B-7B's shapes (~2.3 GB, written once into the cache), "
                        "3.5x the budget: its experts stream")
    p.set_defaults(func=cmd_demo)

    from .bench import register as register_bench
    from ..tools.quantize import register as register_quantize
    from ..tools.synth import register as register_synth

    register_bench(sub)  # weightstream bench kernels | decode | bandwidth
    register_synth(sub)  # weightstream synth --preset NAME OUT.gguf
    register_quantize(sub)  # weightstream quantize IN OUT q2_k | imatrix MODEL -f TEXT
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "perplexity":
        args.ctx = args.ctx_size = args.ctx_size or 512
    try:
        return args.func(args)
    except (WeightstreamError, OSError, ValueError, RuntimeError, MemoryError) as e:  # ours, and the
        # builtins a library below may raise for a bad file or option
        print(f"weightstream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
