"""End-to-end benchmark: tokens/s and the profiler's figures over a sweep of memory budgets.

    python bench/e2e.py MODEL.gguf [--fractions 1,0.5,0.25,0.12] [--policies lru,lfu,decay] \
        [--prefetch none,routing] [--no-page-cache] [--routing synthetic] [-n 16] \
        [--project-layers 60] [--experts-per-token K] --json bench/figures/e2e.json --plot bench/figures/e2e.png

For each budget (a fraction of the model file's size) and each configuration (every cache policy
with prefetch off and on, and the page-cache mode), one fresh process runs inside a memory cgroup
sized to that budget plus the process's own overhead (streaming.OVERHEAD: interpreter, libraries,
vocabulary), with the model's pages dropped first (cold page cache at start) and the profiler on.
The disk is measured before and after (cold parallel preads of expert-sized chunks); ratios are
against the better of the two, as the disk is a bursty shared volume.

Columns: tok/s (decode), reuse (the reuse rate: the hit rate less prefetches' first uses) against Belady's
offline optimum at the same number of slots on the same access trace, stall ms per token, MiB read
per token, read GB/s during decode against the disk, and stall/read: the stall per layer over the
time its missed experts take to read at the disk's bandwidth (<= 1: the reads overlap compute;
1: the step waits exactly for the disk; > 1: the disk idles while the step waits).

--project-layers N (for a `synth --layers K` slice of an N-layer model): the full model's decode
time per token is projected as (measured token time - K x layer time) + N x layer time, i.e. the
slice's per-layer cost (stalls included, at the same cache per layer and the disk measured here)
paid N times; printed and stored as a projection, not a measurement.

--routing synthetic (the default here) replaces the synthetic model's random routers with
engine/observe/routing.py's generator calibrated to flash-moe's measured Qwen3.5-397B routing; `model`
keeps the router. Needs root (cgroup, drop caches).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import OVERHEAD, measure_disk, run_config, stream_options  # noqa: E402

from weightstream.engine.formats.atomic import replacing, write_json  # noqa: E402
from weightstream.engine.stream.budget import fmt_bytes  # noqa: E402

PAGE_CACHE_CONFIG = "page-cache:routing"


def configs(policies: list[str], prefetches: list[str], page_cache: bool) -> list[str]:
    out = [f"{p}:{f}" for p in policies for f in prefetches]
    return out + [PAGE_CACHE_CONFIG] if page_cache else out


def derive(r: dict, disk_gbps: float, project_layers: int | None) -> None:
    """Figures computed from a child's summary, added to r in place."""
    s = r["summary"]
    layers = r["n_layer"]
    r["read_gbps"] = s["bytes_per_token"] * s["decode_tok_s"] / 1e9
    r["read_vs_disk"] = r["read_gbps"] / disk_gbps
    read_ms_per_layer = 1e3 * s["bytes_per_token"] / layers / (disk_gbps * 1e9)
    r["read_ms_per_layer_at_disk"] = read_ms_per_layer
    r["stall_vs_read"] = s["stall_ms_per_layer"] / read_ms_per_layer if read_ms_per_layer else None
    if project_layers:
        other_ms = s["token_ms"] - layers * s["layer_ms"]  # embedding, output head, sampling
        token_ms = other_ms + project_layers * s["layer_ms"]
        r["projection"] = {"layers": project_layers, "token_ms": token_ms, "tok_s": 1e3 / token_ms,
                           "layer_ms": s["layer_ms"], "other_ms": other_ms, "disk_gbps": disk_gbps}


def format_table(results: list[dict]) -> str:
    head = (f"{'budget':>14} {'config':22} {'tok/s':>6} {'reuse':>6} {'belady':>6} {'vs opt':>6} {'stall ms/t':>10} "
            f"{'MiB/tok':>8} {'GB/s':>5} {'vs disk':>7} {'stall/read':>10} {'peak':>9}")
    lines = [head]
    for r in results:
        budget = f"{r['fraction']:.0%} {fmt_bytes(r['budget'])}"
        if "error" in r:
            lines.append(f"{budget:>14} {r['config']:22} {r['error'].strip().splitlines()[-1][:90]}")
            continue
        s = r["summary"]
        opt = f"{s['reuse_vs_belady']:6.0%}" if s.get("belady_hit_rate") else "     -"
        ratio = f"{r['stall_vs_read']:10.2f}" if r["stall_vs_read"] is not None else f"{'-':>10}"
        lines.append(f"{budget:>14} {r['config']:22} {s['decode_tok_s']:6.2f} {s['reuse_rate']:6.1%} "
                     f"{s.get('belady_hit_rate', 0):6.1%} {opt} {s['stall_ms_per_token']:10.0f} "
                     f"{s['bytes_per_token'] / 2**20:8.1f} {r['read_gbps']:5.2f} {r['read_vs_disk']:7.0%} {ratio} "
                     f"{fmt_bytes(r['cgroup_peak']):>9}")
        if "projection" in r:
            p = r["projection"]
            lines.append(f"{'':>14}   projection, {p['layers']} layers: {p['tok_s']:.3f} tok/s "
                         f"({p['layer_ms']:.1f} ms/layer x {p['layers']} + {p['other_ms']:.0f} ms)")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Two panels against the budget (fraction of the model): tokens/s, and hit rate with Belady's
    optimum; one line per configuration (prefetch off dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, (ax_tok, ax_hit) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for spec in dict.fromkeys(r["config"] for r in ok):
        rows = sorted((r for r in ok if r["config"] == spec), key=lambda r: r["fraction"])
        x = [r["fraction"] for r in rows]
        style = "--" if spec.endswith(":none") else "-"
        ax_tok.plot(x, [r["summary"]["decode_tok_s"] for r in rows], style, marker="o", label=spec)
        if spec != PAGE_CACHE_CONFIG:
            ax_hit.plot(x, [r["summary"]["reuse_rate"] for r in rows], style, marker="o", label=spec)
    belady = sorted({(r["fraction"], r["summary"]["belady_hit_rate"]) for r in ok if r["summary"].get("belady_hit_rate")
                     and r["config"] != PAGE_CACHE_CONFIG})
    if belady:
        by_frac: dict[float, float] = {}
        for frac, b in belady:
            by_frac[frac] = max(b, by_frac.get(frac, 0.0))
        ax_hit.plot(list(by_frac), list(by_frac.values()), "k:", marker="x", label="Belady (offline optimum)")
    for ax, label in ((ax_tok, "decode tokens/s"), (ax_hit, "reuse rate (hit rate less prefetches' first uses)")):
        ax.set_xscale("log")
        fractions = sorted({r["fraction"] for r in ok})
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("memory budget (fraction of the model file)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_hit.set_ylim(0, 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png to go by
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--fractions", default="1,0.5,0.25,0.12", help="budgets as fractions of the model file's size")
    ap.add_argument("--policies", default="lru,lfu,decay")
    # lookahead guesses from the next layer's router, which a routing source overrides: under
    # synthetic routing its guesses are noise, so "on" is routing-time issue of a layer's misses
    ap.add_argument("--prefetch", default="none,routing", help="prefetch modes for each policy (off, on)")
    ap.add_argument("--no-page-cache", action="store_true", help="leave out the page-cache mode")
    ap.add_argument("--routing", default="synthetic", help="model | synthetic[:...] | trace:FILE (engine/observe/routing.py)")
    ap.add_argument("-n", "--n-predict", type=int, default=16)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--project-layers", type=int, default=None, help="project tok/s for a model of N such layers")
    ap.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                    help="route to the top K experts instead of the model's count (Engine.load experts_per_token)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)

    size = args.model.stat().st_size
    fractions = [float(x) for x in args.fractions.split(",")]
    specs = configs(args.policies.split(","), args.prefetch.split(","), not args.no_page_cache)
    load_before = os.getloadavg()  # the machine is shared: a busy neighbour shows here
    disk = measure_disk(args.model, args.io_threads)
    print(f"model {args.model.name}: {fmt_bytes(size)}; routing {args.routing}; "
          f"disk {disk['bytes_per_s'] / 1e9:.2f} GB/s cold", flush=True)
    results = []
    for frac in fractions:
        budget = int(size * frac)
        cgroup = budget + OVERHEAD
        for spec in specs:
            policy, prefetch = spec.split(":")
            options = stream_options(budget, policy, prefetch, io_threads=args.io_threads, routing=args.routing,
                                     experts_per_token=args.experts_per_token)
            r = run_config(args.model, cgroup, options, args.n_predict)
            r.update(config=spec, fraction=frac, budget=budget, cgroup=cgroup)
            results.append(r)
            done = r["error"].strip().splitlines()[-1][:120] if "error" in r else \
                f"{r['summary']['decode_tok_s']:.2f} tok/s, reuse {r['summary']['reuse_rate']:.1%}"
            print(f"{frac:.0%} ({fmt_bytes(budget)}) {spec}: {done} [{r['wall_s']:.0f} s]", flush=True)
    after = measure_disk(args.model, args.io_threads, seed=1)
    disk_gbps = max(disk["bytes_per_s"], after["bytes_per_s"]) / 1e9
    for r in results:
        if "error" not in r:
            derive(r, disk_gbps, args.project_layers)
    print(f"disk after: {after['bytes_per_s'] / 1e9:.2f} GB/s; ratios against {disk_gbps:.2f} GB/s")
    print(format_table(results))
    meta = {"model": str(args.model), "size": size, "routing": args.routing, "n_predict": args.n_predict,
            "experts_per_token": args.experts_per_token,
            "overhead": OVERHEAD, "disk": disk, "disk_after": after, "disk_gbps": disk_gbps,
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": [load_before, os.getloadavg()],
            "results": results}
    if args.json:
        write_json(args.json, meta, indent=1)
    if args.plot:
        plot(results, args.plot, f"{args.model.name} ({fmt_bytes(size)}), routing {args.routing}, "
                                 f"cold start, cgroup = budget + {fmt_bytes(OVERHEAD)}, {meta['date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
