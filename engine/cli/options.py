"""What the model-running commands share: the load and sampling options, loading the engine from
them (as Engine.load's options), and the speed and memory lines printed after a run."""
from __future__ import annotations

import argparse
import sys

from ...kernels.backends import BACKENDS
from ..stream.policies import CACHE_POLICIES
from .parser import count, memory_budget, model_path, positive_int


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=model_path, help="path to a GGUF file (any shard of a split model)")
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="kernel threads (default: available cores)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="matmul kernels (kernels/backends.py)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None, help="context length (default: min(train, 4096))")
    p.add_argument("-b", "--batch-size", type=positive_int, default=None,
                   help="prompt tokens per forward pass (default: 256, or what the budget allows)")
    p.add_argument("--experts-per-token", type=positive_int, default=None, metavar="K",
                   help="MoE: route each token to its top K experts (default: the model's count)")
    g = p.add_argument_group("streaming (see Engine.load)")
    g.add_argument("--memory-budget", type=memory_budget, default=None,
                   help="e.g. 3GiB: resident weights + KV cache + buffers + expert cache (implies --stream auto); "
                        "default: none, everything resident")
    g.add_argument("--stream", default=None, choices=["none", "experts", "ffn", "auto"],
                   help="experts: routed experts stay on disk and are read ahead of use; ffn: dense FFNs too; "
                        "auto: experts for a MoE, ffn for a dense model (default: auto with --memory-budget, else none)")
    g.add_argument("--cache-slots", type=positive_int, default=None,
                   help="experts the cache holds (default: what the budget leaves)")
    g.add_argument("--cache-policy", default="decay", choices=CACHE_POLICIES, help="which expert the cache evicts")
    g.add_argument("--prefetch", default="routing", choices=["none", "routing", "lookahead"],
                   help="routing: a layer's experts are read together once its router has chosen them; "
                        "lookahead: the next layer's likely experts are read ahead too; none: one read at a time")
    g.add_argument("--lookahead", type=positive_int, default=None,
                   help="experts guessed per layer with --prefetch lookahead (default: top-k)")
    g.add_argument("--io", default="auto", choices=["auto", "direct", "buffered"],
                   help="direct: O_DIRECT, past the page cache; auto: direct where the filesystem allows")
    g.add_argument("--io-threads", type=positive_int, default=4, help="expert reader threads")
    g.add_argument("--routing", default="model",
                   help="benchmarks only: model | trace:FILE | synthetic[:zipf=Z,reuse=R,seed=S] (engine/observe/routing.py)")
    g = p.add_argument_group("distributed: pipeline stages on Ray (engine/runtime/distributed.py; needs .[distributed])")
    g.add_argument("--ray-address", default=None,
                   help="auto (a running cluster: ray start --head) | ray://HOST:PORT (default: with --stages, a local Ray)")
    g.add_argument("--stages", type=positive_int, default=None,
                   help="pipeline stages, one Ray actor each (default: 2 with --ray-address)")
    g.add_argument("--stage-budgets", default=None, help="per stage memory budget, e.g. 1GiB,1GiB (default: none)")
    g.add_argument("--transport", default="auto", choices=["auto", "compiled", "actor"],
                   help="compiled: Ray compiled graphs; actor: actor calls")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=count, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=count, default=40, help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set with this probability")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below this fraction of the likeliest's probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for recent tokens (1: none)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")


def sampling_options(args) -> dict:
    """The sampling options as Engine.stream's keywords, checked (SamplingParams raises ValueError
    naming the option) so that a bad one is refused before the model loads."""
    from ..runtime.sampling import SamplingParams

    opts = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)
    SamplingParams(**{k: v for k, v in opts.items() if k != "stop"})
    return opts


def load_engine(args, **extra):
    from ..runtime.engine import Engine

    # no --stream: Engine.load streams under a budget or on pipeline stages (LoadOptions.resolved)
    opts = dict(n_ctx=args.ctx_size, n_batch=args.batch_size, routing=args.routing, stream=args.stream,
                memory_budget=args.memory_budget, cache_slots=args.cache_slots, cache_policy=args.cache_policy,
                prefetch=args.prefetch, lookahead=args.lookahead, io=args.io, io_threads=args.io_threads,
                experts_per_token=args.experts_per_token, progress=True, **extra)
    if args.stages or args.ray_address:
        from ..runtime.distributed import DistributedConfig

        budgets = args.stage_budgets.split(",") if args.stage_budgets else None
        opts["distributed"] = DistributedConfig(address=args.ray_address, stages=args.stages or 2, budgets=budgets,
                                                transport=args.transport)
    return Engine.load(args.model, threads=args.threads, backend=args.backend, **opts)


def print_speed(engine) -> None:
    s = engine.stats()
    print(f"\n[{s['prompt_tokens']} prompt tokens, {s['prefill_tok_s']:.1f} tok/s prefill; "
          f"{s['generated_tokens']} generated in {s['decode_passes']} decode passes, {s['decode_tok_s']:.1f} tok/s "
          f"decode (the first token comes from the prompt's pass); load {s['load_s']:.2f} s]", file=sys.stderr)
    if "memory" in s:
        print(f"[memory: {engine.plan.describe()}]", file=sys.stderr)
    if "experts" in s:
        x, pf = s["experts"], s["experts"]["prefetch"]
        print(f"[experts: {x['slots']} cached, hit rate {x['hit_rate']:.1%} ({x['hits']} hits, {x['late']} late, "
              f"{x['misses']} misses), {x['bytes_read'] / 2**20:.1f} MiB read in {x['reads']} preads, "
              f"stalled {x['stall_s']:.2f} s; prefetch: {pf['issued']} issued, {pf['used']} used, "
              f"{pf['wasted']} wasted, {pf['cancelled']} cancelled]", file=sys.stderr)
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
