"""Streaming benchmark: a model larger than memory, run inside a memory cgroup, against the disk.

    python bench/streaming.py MODEL.gguf --cgroup 3GiB [--budget 2.7GiB] [-n 32] \
        [--config lru:routing --config lru:lookahead --config page-cache:lookahead ...] \
        [--json out.json]

For one run: the disk's raw bandwidth is measured first (`weightstream bench io`: parallel cold
preads of expert-sized chunks of the model file after dropping it from the page cache); then each
configuration (cache_policy:prefetch[:io]) runs in a fresh process inside a memory cgroup of
--cgroup bytes (page cache included), with the model's pages dropped first so every run starts
cold. Each child generates -n tokens greedily from a fixed prompt with the profiler on and prints
its figures; this script prints a table (tokens/s, read GB/s and its ratio to the disk's, reuse
rate and its ratio to Belady's optimum at the same capacity, stall ms/token, cgroup peak) and
writes everything as JSON. Needs root (cgroup, drop caches).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from weightstream.engine.formats.atomic import write_json  # noqa: E402
from weightstream.engine.stream.disk import disk_bandwidth, drop_cached_pages  # noqa: E402
from weightstream.engine.stream.budget import fmt_bytes, parse_size  # noqa: E402
from cgroup import MemoryCgroup  # noqa: E402  (bench/cgroup.py)
from weightstream.engine.stream.layout import expert_layouts  # noqa: E402
from weightstream.engine.formats.gguf_file import GGUFFile  # noqa: E402

PROMPT = "The history of the printing press begins"
# What the process needs beyond the engine's budget inside the cgroup: interpreter and libraries,
# the parsed metadata and tokenizer of a 152k-token vocabulary, thread stacks, and room for the
# page cache to keep our own code and the file's metadata (a cgroup squeezed to the last page
# evicts the libraries' code and thrashes).
OVERHEAD = 512 * 2**20

CHILD = textwrap.dedent("""
    import json, sys, time
    from weightstream.engine import Engine
    path, options, n_new, prompt = sys.argv[1:5]
    t0 = time.perf_counter()
    with Engine.load(path, **json.loads(options)) as eng:
        load_s = time.perf_counter() - t0
        tokens = list(eng.generate_tokens(prompt, int(n_new)))
        st = eng.stats()
        summary = st.pop("profile", None) or {"decode_tok_s": st["decode_tok_s"]}
        summary["token_ms"] = 1e3 / st["decode_tok_s"] if st["decode_tok_s"] else 0.0  # output head included
        print(json.dumps({"tokens": tokens, "stats": st, "summary": summary, "load_s": load_s,
                          "n_layer": eng.config.n_layer, "plan": eng.plan.describe() if eng.plan else "resident"}))
""")


def stream_options(budget: int | None, policy: str, prefetch: str, io: str = "auto", io_threads: int = 4,
                   **extra) -> dict:
    """Engine.load options for one streaming configuration (budget None: resident, no profiler)."""
    if budget is None:
        return dict(n_ctx=512, **extra)
    return dict(n_ctx=512, stream="experts", memory_budget=int(budget), cache_policy=policy, prefetch=prefetch,
                io=io, io_threads=io_threads, profile=True, **extra)


def run_config(model: Path, cgroup_bytes: int | None, options: dict, n_new: int, prompt: str = PROMPT) -> dict:
    """One child process running Engine.load(model, **options), cold page cache, inside a memory
    cgroup of cgroup_bytes (None: none); returns its figures, or {"error": ...}."""
    drop_cached_pages(model)
    argv = [sys.executable, "-c", CHILD, str(model), json.dumps(options), str(n_new), prompt]
    t0 = time.perf_counter()
    if cgroup_bytes is None:
        out, peak, kills = subprocess.run(argv, capture_output=True, text=True, timeout=3600), None, 0
    else:
        with MemoryCgroup(cgroup_bytes) as cg:
            out = cg.run(argv, capture_output=True, text=True, timeout=3600)
        peak, kills = cg.peak_bytes, cg.oom_kills
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": f"exit {out.returncode} (oom kills {kills}): {out.stderr[-1500:]}", "wall_s": wall}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(cgroup_peak=peak, oom_kills=kills, wall_s=wall)
    return r


def measure_disk(model: Path, io_threads: int, seed: int = 0) -> dict:
    """Cold parallel preads of expert-sized chunks of the model file (`weightstream bench io`)."""
    with GGUFFile(model) as f:
        expert_bytes = max(lay.expert_bytes for lay in expert_layouts(f).values())
    return disk_bandwidth(model, chunk_bytes=expert_bytes, threads=io_threads, n_reads=400, seed=seed)


def format_table(results: list[dict], disk_gbps: float) -> str:
    lines = [f"{'config':24} {'tok/s':>6} {'read GB/s':>9} {'vs disk':>7} {'reuse':>6} {'belady':>6} {'vs opt':>6} "
             f"{'stall ms/t':>10} {'MiB/tok':>8} {'peak':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:24} {r['error']}")
            continue
        s = r["summary"]
        gbps = r["decode_read_gbps"] = s["bytes_per_token"] * s["decode_tok_s"] / 1e9  # decode reads per second
        lines.append(f"{r['config']:24} {s['decode_tok_s']:6.2f} {gbps:9.2f} {gbps / disk_gbps:7.0%} "
                     f"{s['reuse_rate']:6.1%} {s['belady_hit_rate']:6.1%} {s['reuse_vs_belady']:6.0%} "
                     f"{s['stall_ms_per_token']:10.0f} {s['bytes_per_token'] / 2**20:8.1f} {fmt_bytes(r['cgroup_peak']):>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--cgroup", default="3GiB", help="memory cgroup limit (page cache included)")
    ap.add_argument("--budget", default=None, help="engine memory budget (default: cgroup - 512 MiB overhead)")
    ap.add_argument("-n", "--n-predict", type=int, default=32)
    ap.add_argument("--config", action="append", default=None,
                    help="cache_policy:prefetch[:io], repeatable (default: a standard set)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    cgroup_bytes = parse_size(args.cgroup)
    budget = parse_size(args.budget) if args.budget else cgroup_bytes - OVERHEAD
    configs = args.config or ["lru:none", "lru:routing", "lru:lookahead", "lfu:lookahead", "decay:lookahead",
                              "page-cache:lookahead"]
    size = args.model.stat().st_size
    disk = measure_disk(args.model, args.io_threads)
    disk_gbps = disk["bytes_per_s"] / 1e9
    print(f"model {args.model.name}: {fmt_bytes(size)}; cgroup {fmt_bytes(cgroup_bytes)}, budget {fmt_bytes(budget)}; "
          f"disk {disk_gbps:.2f} GB/s ({args.io_threads} threads, {fmt_bytes(disk['chunk_bytes'])} cold reads)", flush=True)
    results = []
    for spec in configs:
        policy, prefetch, *rest = spec.split(":")
        options = stream_options(budget, policy, prefetch, rest[0] if rest else "auto", args.io_threads)
        r = run_config(args.model, cgroup_bytes, options, args.n_predict)
        r["config"] = spec
        results.append(r)
        done = r["error"] if "error" in r else f"{r['summary']['decode_tok_s']:.2f} tok/s"
        print(f"{spec}: {done}", flush=True)
    after = measure_disk(args.model, args.io_threads, seed=1)
    # the disk is shared and bursty (a cloud volume): its capability is the better of the two measurements
    disk_best = max(disk_gbps, after["bytes_per_s"] / 1e9)
    print(f"disk after the runs: {after['bytes_per_s'] / 1e9:.2f} GB/s; ratios below are against {disk_best:.2f}")
    print(format_table(results, disk_best))
    if args.json:
        write_json(args.json, {"model": str(args.model), "size": size, "cgroup": cgroup_bytes, "budget": budget,
                               "disk": disk, "disk_after": after, "date": time.strftime("%Y-%m-%d"), "results": results},
                   indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
