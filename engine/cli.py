"""The `weightstream` command (also `python -m engine`)."""
from __future__ import annotations

import argparse
import json
import sys
import time

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a GGUF file (any shard of a split model)")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: available cores)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cython", "numba"])
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: min(train, 4096))")
    p.add_argument("--stream", default="none", choices=["none", "experts"],
                   help="experts: read routed experts from the file on use into a cache")
    p.add_argument("--cache-slots", type=int, default=None, help="experts the cache holds (default: one layer's)")
    p.add_argument("--cache-policy", default="lru", choices=["lru", "lfu", "decay"])


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


def _load(args):
    from .api import Engine

    opts = {"n_ctx": args.ctx_size} if args.ctx_size else {}
    if args.stream != "none":
        opts.update(stream=args.stream, cache_slots=args.cache_slots, cache_policy=args.cache_policy)
    return Engine.load(args.model, threads=args.threads, backend=args.backend, **opts)


def _print_speed(engine) -> None:
    s = engine.stats()
    print(f"\n[{s['prompt_tokens']} prompt tokens, {s['prefill_tok_s']:.1f} tok/s prefill; "
          f"{s['generated_tokens']} generated, {s['decode_tok_s']:.1f} tok/s decode; load {s['load_s']:.2f} s]",
          file=sys.stderr)
    if "experts" in s:
        x = s["experts"]
        print(f"[experts: {x['slots']} cached, hit rate {x['hit_rate']:.1%} ({x['hits']} hits, {x['misses']} misses), "
              f"{x['bytes_read'] / 2**20:.1f} MiB read in {x['reads']} reads]", file=sys.stderr)


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
    from .gguf_file import GGUFFile
    from .info import format_info, model_info

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


def cmd_convert(args) -> int:
    from .convert import convert_hf_to_gguf

    out = convert_hf_to_gguf(args.hf_dir, args.out, args.type, progress=True)
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .api import Engine
    from .assets import demo_model_path

    path = demo_model_path(args.cache_dir)
    with Engine.load(path, threads=args.threads) as engine:
        print(f"model: {path.name} ({engine.config.arch}, {engine.config.n_layer} layers), "
              f"loaded in {engine.load_s:.2f} s", file=sys.stderr)
        print(f"> {args.prompt}")
        for piece in engine.chat([{"role": "user", "content": args.prompt}], args.n_predict, stream=True):
            print(piece, end="", flush=True)
        print()
        _print_speed(engine)
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

    p = sub.add_parser("convert", help="write GGUF from a Hugging Face safetensors directory")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="fetch the demo model (SmolLM2-135M-Instruct Q4_1) and generate")
    p.add_argument("-p", "--prompt", default=DEMO_PROMPT)
    p.add_argument("-n", "--n-predict", type=int, default=96)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="where the model is cached (default ~/.cache/weightstream)")
    p.set_defaults(func=cmd_demo)

    from .bench_cli import register as register_bench

    register_bench(sub)  # weightstream bench kernels | decode | bandwidth
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "perplexity":
        args.ctx = args.ctx_size = args.ctx_size or 512
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"weightstream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
