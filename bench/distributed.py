"""Pipeline overhead on Ray (engine/runtime/distributed.py): 2 stages on one machine against one process.

    python bench/distributed.py [--model MODEL.gguf] [-n 32] [--hops 500] [--json bench/figures/distributed.json]

Two figures, each for Compiled Graphs and for plain actor calls:
  empty hops   a float32[1, n_embd] residual sent driver -> stage 0 -> stage 1 -> driver through
               stage actors that only return it (no model): what the transport alone costs per
               round trip, and per hop (round trip / 3);
  real decode  greedy decode of the same model and prompt in one process and as 2 stages (each
               stage one kernel thread, as the single process): ms/token, and the pipeline's
               overhead = (its decode time - the stages' own compute) / 3 hops, as the driver
               measures it for every token.
The model (default: the first 4 layers of a synthetic OLMoE-1B-7B, Q2_K experts, written once to
/tmp/ws_dist_bench/) streams its experts in both set-ups with a cache that holds all of them, so
after the warm-up the figures compare compute and transport, not the disk.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


from weightstream.engine import Engine  # noqa: E402
from weightstream.engine.formats.atomic import write_json  # noqa: E402
from weightstream.engine.runtime.distributed import DistributedConfig, _Stage  # noqa: E402
from weightstream.engine.formats.gguf_file import GGUFFile  # noqa: E402
from weightstream.engine.model.config import ModelConfig  # noqa: E402

PROMPT = "The history of the printing press begins"
DEFAULT_MODEL = Path("/tmp/ws_dist_bench/olmoe-1b-7b-4l.gguf")


def default_model() -> Path:
    if not DEFAULT_MODEL.exists():
        from weightstream.engine.tools.synth import synth_model

        DEFAULT_MODEL.parent.mkdir(parents=True, exist_ok=True)
        synth_model(DEFAULT_MODEL, "olmoe-1b-7b", layers=4, progress=False)
    return DEFAULT_MODEL


def empty_hops(ray, n_embd: int, n: int) -> dict:
    """Round trips of a float32[1, n_embd] residual through 2 echoing stage actors."""
    from ray.dag import InputNode

    cls = ray.remote(_Stage)
    actors = [cls.options(num_cpus=1).remote(s, "", 1, "auto") for s in range(2)]
    ray.get([a.ping.remote() for a in actors], timeout=120)
    x = np.random.default_rng(0).standard_normal((1, n_embd), dtype=np.float32)
    out = {"payload_bytes": x.nbytes, "round_trips": n}

    def timed(call) -> np.ndarray:
        for _ in range(min(50, n)):
            call()
        t = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            call()
            t[i] = time.perf_counter() - t0
        return t

    def chain():
        ref = (x, 0, [])
        for a in actors:
            ref = a.echo.remote(ref)
        return ray.get(ref, timeout=60)

    with InputNode() as inp:
        node = inp
        for a in actors:
            node = a.echo.bind(node)
    dag = node.experimental_compile(_submit_timeout=60)
    try:
        out["compiled"] = summarize(timed(lambda: ray.get(dag.execute((x, 0, [])), timeout=60)), 3)
    finally:
        dag.teardown()
    out["actor"] = summarize(timed(chain), 3)
    for a in actors:
        ray.kill(a)
    return out


def summarize(t: np.ndarray, hops: int) -> dict:
    ms = t * 1e3
    return {"round_trip_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                              "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))},
            "per_hop_ms_p50": float(np.percentile(ms, 50)) / hops, "per_hop_ms_mean": float(ms.mean()) / hops}


def decode(model: Path, n_tokens: int, slots: int, distributed=None) -> dict:
    opts = dict(n_ctx=256, threads=1, stream="experts", cache_slots=slots, prefetch="routing")
    t0 = time.perf_counter()
    with Engine.load(model, distributed=distributed, **opts) as eng:
        load_s = time.perf_counter() - t0
        list(eng.generate_tokens(PROMPT, n_tokens))  # warm-up: fills the expert cache
        if distributed is not None:  # the figures of the measured run only
            for hs in eng.model.hops.values():
                hs.calls, hs.tokens, hs.total_s, hs.compute_s = 0, 0, 0.0, [0.0] * len(hs.compute_s)
        tokens = list(eng.generate_tokens(PROMPT, n_tokens))
        s = eng.stats()
        out = {"load_s": load_s, "tokens": tokens, "decode_steps": eng.last_stats.decode_steps,
               "ms_per_token": 1e3 * eng.last_stats.decode_s / max(1, eng.last_stats.decode_steps),
               "prefill_tok_s": s["prefill_tok_s"]}
        if distributed is not None:
            p = s["pipeline"]
            out.update(transport=p["transport"], transport_note=p["transport_note"], latency=p["latency"],
                       stages=[{k: st[k] for k in ("layers", "memory", "experts", "compute_s", "steps")}
                               for st in p["stages"]])
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("-n", "--n-tokens", type=int, default=32)
    ap.add_argument("--hops", type=int, default=500, help="empty round trips per transport")
    ap.add_argument("--json", default=str(Path(__file__).parent / "figures" / "distributed.json"))
    args = ap.parse_args(argv)
    import ray

    model = Path(args.model) if args.model else default_model()
    with GGUFFile(model) as f:
        cfg = ModelConfig.from_metadata(f.metadata)
    slots = cfg.n_layer * cfg.n_expert  # every expert fits: the disk is out of the comparison
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
                  "model": {"path": str(model), "arch": cfg.arch, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                            "n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used},
                  "empty_hops": empty_hops(ray, cfg.n_embd, args.hops)}
        single = decode(model, args.n_tokens, slots)
        result["decode"] = {"single_process": single}
        for transport in ("compiled", "actor"):
            dist = DistributedConfig(stages=2, transport=transport, disk_bps=[1e9, 1e9])  # equal nodes: 2 + 2 layers
            r = decode(model, args.n_tokens, slots, dist)
            r["tokens_identical"] = r.pop("tokens") == single["tokens"]
            r["overhead_ms_per_token"] = r["ms_per_token"] - single["ms_per_token"]
            result["decode"][transport] = r
        single.pop("tokens")
    finally:
        ray.shutdown()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result, indent=2)
    e, d = result["empty_hops"], result["decode"]
    print(f"empty hops ({e['payload_bytes']} B): compiled {e['compiled']['per_hop_ms_p50']:.3f} ms/hop (p50), "
          f"actor {e['actor']['per_hop_ms_p50']:.3f} ms/hop")
    print(f"decode: one process {d['single_process']['ms_per_token']:.2f} ms/token")
    for t in ("compiled", "actor"):
        lat = d[t]["latency"]["decode"]
        print(f"decode: 2 stages, {d[t]['transport']}: {d[t]['ms_per_token']:.2f} ms/token "
              f"(+{d[t]['overhead_ms_per_token']:.2f} ms), measured {lat['per_hop_ms']:.3f} ms/hop, "
              f"tokens identical: {d[t]['tokens_identical']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
