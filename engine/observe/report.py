"""The prefetch profiler's outputs: a Chrome trace, three PNG plots, the summary as JSON and as a
paragraph (engine/observe/profiler.py records and computes; this module only writes files and text).

    write_report(prof, summary, plot_path="out.png", trace_path="trace.json", json_path="out.json")

- chrome_trace: opens in Perfetto (ui.perfetto.dev) or chrome://tracing. One track for compute
  (forward passes, layers nested in them, stalls nested in those) and one per reader thread (reads).
  The prefetch events (issued/used/...) carry no time in the Profiler, so they are not drawn.
- plot_token_timeline: one decode pass, compute against the readers: where the stalls come from.
- plot_hit_rate_per_layer: which layers the cache serves badly.
- plot_hit_rate_vs_cache: our hit rate against each policy and the optimum at other cache sizes.

Every file is written to a temporary name in its directory and moved into place (engine/formats/atomic.py),
so a reader never sees half a file. matplotlib is optional (the `plot` extra) and imported only
when a plot is asked for.
"""
from __future__ import annotations

from pathlib import Path

from ..formats.atomic import replacing, write_json
from ..stream.reader import DEMAND

_COMPUTE_TID, _PID = 0, 1
_STALL, _DEMAND, _PREFETCH, _LAYER = "tab:red", "tab:orange", "tab:blue", ("0.55", "0.78")


# ---- Chrome trace --------------------------------------------------------------------------------
def chrome_trace(prof, path) -> Path:
    """Write prof's records as Chrome Trace Event Format JSON; returns the path."""
    us = lambda t: (t - prof.t_origin) * 1e6  # noqa: E731  (perf_counter seconds -> trace µs)

    def span(name, cat, tid, t0, t1, **args):
        return {"name": name, "cat": cat, "ph": "X", "pid": _PID, "tid": tid,
                "ts": us(t0), "dur": (t1 - t0) * 1e6, "args": args}

    def meta(name, tid, value):
        return {"name": name, "ph": "M", "pid": _PID, "tid": tid, "args": {"name": value}}

    threads = sorted({job.thread for job in prof.reads})
    events = [meta("process_name", _COMPUTE_TID, "weightstream"), meta("thread_name", _COMPUTE_TID, "compute")]
    events += [meta("thread_name", t + 1, f"reader {t}") for t in threads]
    events += [span(f"forward {f} ({n} tokens)", "forward", _COMPUTE_TID, t0, t1, forward=f, tokens=n)
               for f, n, t0, t1 in prof.forwards]
    events += [span(f"layer {layer}", "layer", _COMPUTE_TID, t0, t1, forward=f)
               for f, layer, t0, t1 in prof.layers]
    events += [span(f"stall: waiting for layer {layer}'s experts", "stall", _COMPUTE_TID, t0, t1, forward=f)
               for f, layer, t0, t1 in prof.stalls]
    for job in prof.reads:
        layer, expert = job.key
        args = {"bytes": job.nbytes, "wanted": job.wanted, "forward": job.forward,
                "queued_ms": (job.t_start - job.t_queued) * 1e3}
        if job.error is not None:
            args["error"] = str(job.error)
        events.append(span(f"read {layer}/{expert}", "demand" if job.priority == DEMAND else "prefetch",
                           job.thread + 1, job.t_start, job.t_end, **args))
    return write_json(path, {"traceEvents": events, "displayTimeUnit": "ms"})


# ---- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install -e '.[plot]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # the temporary name has no .png to go by
    return path


def _legend(ax, **kw) -> None:
    """Outside the axes, on the right: inside, it would hide bars or curves."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", **kw)


def _percent_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def plot_token_timeline(prof, path, forward: int | None = None) -> Path:
    """One forward pass (default: the median-duration decode pass) as a Gantt chart."""
    if not prof.forwards:
        raise ValueError("plot_token_timeline: the profiler recorded no forward pass")
    if forward is None:
        passes = [f for f in prof.forwards if f[1] == 1] or prof.forwards  # a prefill-only run: any pass
        passes = sorted(passes, key=lambda f: f[3] - f[2])
        forward = passes[(len(passes) - 1) // 2][0]  # the lower median: an actual pass
    match = [f for f in prof.forwards if f[0] == forward]
    if not match:
        raise ValueError(f"plot_token_timeline: no forward pass {forward} (recorded: 0..{len(prof.forwards) - 1})")
    _, n_tok, t0, t1 = match[0]
    ms = lambda t: (t - t0) * 1e3  # noqa: E731

    threads = sorted({job.thread for job in prof.reads})  # every reader, even one idle in this pass
    fig = _figure(11, 1.6 + 0.45 * (1 + len(threads)))
    ax = fig.add_subplot()
    rows = {"compute": 0} | {f"reader {t}": i + 1 for i, t in enumerate(threads)}

    def bars(row, spans, **style):
        if spans:
            ax.broken_barh([(ms(a), (b - a) * 1e3) for a, b in spans], (row - 0.4, 0.8), **style)

    layers = sorted((a, b) for f, _, a, b in prof.layers if f == forward)
    for shade in (0, 1):  # alternate shades so that neighbouring layers are told apart
        bars(0, layers[shade::2], facecolors=_LAYER[shade])
    bars(0, [(a, b) for f, _, a, b in prof.stalls if f == forward], facecolors=_STALL)
    # Reads by time, not by job.forward: a prefetch queued in the previous pass may land in this one.
    in_pass = [j for j in prof.reads if j.t_end >= t0 and j.t_start <= t1]
    for demand, color in ((True, _DEMAND), (False, _PREFETCH)):
        for i, t in enumerate(threads):
            bars(i + 1, [(j.t_start, j.t_end) for j in in_pass if j.thread == t and (j.priority == DEMAND) == demand],
                 facecolors=color)

    ax.set_yticks(list(rows.values()), list(rows))
    ax.invert_yaxis()  # compute on top
    ax.set_xlim(0, (t1 - t0) * 1e3)
    ax.set_xlabel("ms since the pass started")
    ax.set_title(f"forward {forward}: {n_tok} token{'s' if n_tok > 1 else ''} in {(t1 - t0) * 1e3:.1f} ms "
                 f"= {n_tok / (t1 - t0):.2f} tok/s (grey: layers, alternately shaded)")
    from matplotlib.patches import Patch  # here, not at the top: matplotlib is optional (_figure checked)

    # Proxy patches: the legend names every colour even when this pass has no bar of it.
    _legend(ax, handles=[Patch(color=c, label=n) for c, n in ((_STALL, "stall"), (_DEMAND, "demand read"),
                                                              (_PREFETCH, "prefetch read"))])
    return _save(fig, path)


def plot_hit_rate_per_layer(summary: dict, path) -> Path:
    """Bars of each layer's hit rate, with the overall rate and the Belady optimum as lines."""
    per_layer = {int(k): v for k, v in summary.get("hit_rate_per_layer", {}).items()}  # JSON keys are strings
    fig = _figure(max(8.0, 0.25 * len(per_layer) + 4), 3.6)
    ax = fig.add_subplot()
    ax.bar(list(per_layer), list(per_layer.values()), color=_PREFETCH, width=0.8)
    ax.axhline(summary.get("hit_rate", 0.0), color="black", label=f"overall {summary.get('hit_rate', 0.0):.1%}")
    if "belady_hit_rate" in summary:
        ax.axhline(summary["belady_hit_rate"], color="black", linestyle="--",
                   label=f"Belady optimum {summary['belady_hit_rate']:.1%}")
    _percent_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("hit rate")
    ax.set_title("hit rate per layer (expert in memory when needed: cached, or being read by a prefetch)")
    _legend(ax)
    return _save(fig, path)


def plot_hit_rate_vs_cache(summary: dict, path) -> Path:
    """Each policy's hit rate and the optimum's over cache sizes (log2), with our size and rate marked."""
    rows = sorted(summary.get("sweep", []), key=lambda r: r["capacity"])
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    caps = [r["capacity"] for r in rows]
    policies = [k for k in (rows[0] if rows else {}) if k not in ("capacity", "belady")]
    for p in policies:
        ax.plot(caps, [r[p] for r in rows], marker="o", label=p)
    if rows:
        # Belady is the optimum of demand paging: with prefetch (late reads count as hits) we can beat it.
        ax.plot(caps, [r["belady"] for r in rows], "k--", marker="s", label="Belady (optimum without prefetch)")
    if "cache_slots" in summary:
        ax.axvline(summary["cache_slots"], color="0.5", linewidth=1)
        ax.plot([summary["cache_slots"]], [summary.get("hit_rate", 0.0)], "r*", markersize=14,
                label=f"measured hit rate {summary.get('hit_rate', 0.0):.1%} at {summary['cache_slots']} slots "
                      "(prefetches included)")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(caps) | ({summary["cache_slots"]} if "cache_slots" in summary else set()))
    if ticks:
        ax.set_xticks(ticks, [str(c) for c in ticks])  # slot counts, not powers of two
    _percent_axis(ax)
    ax.set_xlabel("cache capacity (experts)")
    ax.set_ylabel("hit rate")
    ax.set_title("hit rate vs cache size (each policy replayed on the recorded accesses)")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save(fig, path)


# ---- the report --------------------------------------------------------------------------------
def _sibling(path: Path, tag: str) -> Path:
    """out.png -> out.<tag>.png"""
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def write_report(prof, summary: dict, plot_path=None, trace_path=None, json_path=None) -> list[Path]:
    """Write the files asked for; returns their paths. plot_path "out.png" gives out.png (the token
    timeline), out.hit_layers.png and out.hit_cache.png."""
    written = []
    if json_path:
        written.append(write_json(json_path, summary, indent=1))  # int keys (layers) become strings
    if trace_path:
        written.append(chrome_trace(prof, trace_path))
    if plot_path:
        plot_path = Path(plot_path)
        written.append(plot_token_timeline(prof, plot_path))
        written.append(plot_hit_rate_per_layer(summary, _sibling(plot_path, "hit_layers")))
        written.append(plot_hit_rate_vs_cache(summary, _sibling(plot_path, "hit_cache")))
    return written


PREFETCH_WHY_NONE = {
    "routing": "no prefetch issued: --prefetch routing reads a layer's experts once its router has chosen them "
               "(together, as demand reads); --prefetch lookahead reads the next layer's likely experts ahead",
    "none": "no prefetch issued (--prefetch none: one demand read at a time)",
}


def format_summary(s: dict) -> str:
    """The summary as one paragraph for the terminal, its figures named as in the JSON (see
    engine/observe/profiler.py: one hit rate; decode passes; expert reads and preads); clauses
    whose figures are missing are left out."""
    parts = [f"{s.get('decode_passes', 0)} decode passes at {s.get('decode_tok_s', 0.0):.2f} tok/s"]
    hit = f"hit rate {s.get('hit_rate', 0.0):.1%} (expert in memory when its layer needed it"
    if "reuse_rate" in s:
        hit += f": {s.get('hit_rate', 0.0) - s['reuse_rate']:.1%} prefetched, {s['reuse_rate']:.1%} reused"
        if s.get("belady_hit_rate"):
            hit += (f"; reuse against Belady's offline optimum without prefetch at {s.get('cache_slots', '?')} slots, "
                    f"{s['belady_hit_rate']:.1%}")
    parts.append(hit + ")")
    pf = s.get("prefetch", {})
    if pf.get("issued"):
        parts.append(f"prefetch precision {pf['precision']:.0%} recall {pf['recall']:.0%} ({pf['issued']} issued, "
                     f"{pf.get('used', 0)} used, {pf.get('wasted', 0)} wasted, {pf.get('cancelled', 0)} cancelled)")
    else:
        parts.append(PREFETCH_WHY_NONE.get(s.get("prefetch_mode"), "no prefetch issued"))
    parts.append(f"stall {s.get('stall_ms_per_token', 0.0):.0f} ms/token")
    parts.append(f"{s.get('expert_reads', 0)} expert reads ({s.get('preads', 0)} preads), "
                 f"{s.get('reads_per_token', 0.0):.1f} reads and {s.get('bytes_per_token', 0.0) / 2**20:.1f} MiB "
                 "per decode pass")
    reads = f"reads {s.get('read_gbps_wall', 0.0):.2f} GB/s"
    if s.get("disk_gbps"):
        reads += f" (disk {s['disk_gbps']:.2f} GB/s: {s.get('read_vs_disk', 0.0):.0%}"
        if s.get("read_vs_disk", 0.0) > 1:  # faster than the disk: not all of it came from the disk
            reads += ("; above the disk: with O_DIRECT, the disk measurement understates parallel reads of this size"
                      if s.get("direct_io") else
                      "; above the disk: buffered reads were served in part by the page cache (parts of the "
                      "file read before), not by the disk")
        reads += ")"
    parts.append(reads)
    return "; ".join(parts) + "."
