"""The prefetch profiler: what the expert cache and the readers did, per forward pass and layer.

Recording is a few list appends per expert access, read and layer, and nothing at all when the
engine has no profiler (every hook is behind `if profiler is not None`). The figures are computed
afterwards from the records:

    prof = Profiler()                      # Engine.load(..., profile=True) makes one
    ... run ...
    prof.summary(n_slots=..., disk_gbps=...)  # hit rate, prefetch precision/recall, stalls, bytes
    prof.access_trace()                    # [(layer, expert), ...] in access order: Belady's input

One definition of hit rate, everywhere (this summary, ExpertStore.summary, the console, the plots):
the share of expert uses that found the expert in memory, in the cache or already being read by a
prefetch ((hits + late) / uses): the uses that spared the compute thread a read of its own.
Part of that comes from prefetches (a prefetched expert's first use) and the rest from reuse (the
expert was still cached from an earlier use): reuse_rate, the figure Belady's offline optimum (a
demand-paged cache: no prefetch) is compared with.

Counts: a decode pass is one forward pass of one token. A generation of N tokens makes N - 1 of
them (the first token comes from the prompt's pass, the last needs none), so decode_passes is one
less than Engine.stats()'s generated_tokens. A read is one expert's (expert_reads), made of one
pread per contiguous byte range (preads, what ExpertStore.summary counts as "reads": three per
expert where its gate, up and down matrices lie apart in the file).

Records (times are perf_counter seconds):
    forwards  (index, n_tokens, t0, t1)             one Model.forward call
    layers    (forward, layer, t0, t1)              one transformer block, stalls included
    accesses  (forward, layer, expert, outcome)     outcome: "hit" (in the cache), "late" (being
                                                    read by a prefetch), "miss" (read on demand)
    stalls    (forward, layer, t0, t1)              the compute thread blocked on a read
    reads     ReadJob objects as they finish        thread, queued/start/end times, bytes, priority
    prefetch  (forward, layer, expert, event)       "issued", "used", "wasted", "cancelled"
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

from ..stream.policies import POLICIES, belady_hits, sweep


class Profiler:
    def __init__(self):
        self.t_origin = time.perf_counter()
        self.forwards: list[tuple[int, int, float, float]] = []
        self.layers: list[tuple[int, int, float, float]] = []
        self.accesses: list[tuple[int, int, int, str]] = []
        self.stalls: list[tuple[int, int, float, float]] = []
        self.reads: list = []  # ReadJob, appended by reader threads (list.append is atomic)
        self.prefetch: list[tuple[int, int, int, str]] = []
        self.forward = -1  # index of the forward pass being recorded

    def clear(self) -> None:
        """Drop every record (a server keeps one generation's: serve/worker.py). The pass counter
        goes on, so a read still in flight lands tagged with a pass no new record has."""
        self.forwards, self.layers, self.accesses, self.stalls, self.reads, self.prefetch = [], [], [], [], [], []

    # ---- hooks --------------------------------------------------------------------------------
    def begin_forward(self, n_tokens: int) -> float:
        self.forward += 1
        return time.perf_counter()

    def end_forward(self, n_tokens: int, t0: float) -> None:
        self.forwards.append((self.forward, n_tokens, t0, time.perf_counter()))

    def layer(self, layer: int, t0: float, t1: float) -> None:
        self.layers.append((self.forward, layer, t0, t1))

    def access(self, layer: int, expert: int, outcome: str) -> None:
        self.accesses.append((self.forward, layer, expert, outcome))

    def stall(self, layer: int, t0: float, t1: float) -> None:
        self.stalls.append((self.forward, layer, t0, t1))

    def read_queued(self, job) -> None:
        """A read was queued: tag it with the forward pass that queued it (the store never reads
        the profiler; the tag travels with the job to read_done and the reports)."""
        job.forward = self.forward

    def read_done(self, job) -> None:
        self.reads.append(job)

    def prefetch_event(self, key, event: str) -> None:
        self.prefetch.append((self.forward, key[0], key[1], event))

    # ---- figures ------------------------------------------------------------------------------
    def access_trace(self) -> list[tuple[int, int]]:
        return [(layer, expert) for _, layer, expert, _ in self.accesses]

    def summary(self, n_slots: int | None = None, disk_gbps: float | None = None,
                sweep_capacities=None, with_sweep: bool = True) -> dict:
        """Every figure as a plain dict (JSON-ready). Decode figures count forward passes of one
        token; prefill passes are reported apart. with_sweep=False leaves out the replay of every
        policy at several capacities (the costly part: seconds for a long trace)."""
        decode = [f for f in self.forwards if f[1] == 1]
        decode_ids = {f[0] for f in decode}
        decode_s = sum(t1 - t0 for _, _, t0, t1 in decode)
        n_tok = len(decode)
        outcomes = Counter(o for *_, o in self.accesses)
        n_access = sum(outcomes.values())
        ev = Counter(e for *_, e in self.prefetch)
        misses, used = outcomes["miss"], ev["used"]
        stall_decode = sum(t1 - t0 for f, _, t0, t1 in self.stalls if f in decode_ids)
        reads = [j for j in self.reads if j.nbytes]
        read_bytes = sum(j.nbytes for j in reads)
        wall = sum(t1 - t0 for _, _, t0, t1 in self.forwards)
        busy = _union_seconds([(j.t_start, j.t_end) for j in reads])
        lat = sorted(j.t_end - j.t_start for j in reads)
        # one transformer block of a decode pass, stalls included: the per-layer cost a model with
        # more layers of the same shape would pay per token (bench/slice.py projects with it)
        decode_layers = [t1 - t0 for f, _, t0, t1 in self.layers if f in decode_ids]
        out = {
            "forwards": len(self.forwards),
            "decode_passes": n_tok,
            "decode_tok_s": n_tok / decode_s if decode_s else 0.0,
            "prefill_tokens": sum(f[1] for f in self.forwards if f[1] > 1),
            "accesses": n_access,
            "hits": outcomes["hit"], "late": outcomes["late"], "misses": misses,
            "hit_rate": (outcomes["hit"] + outcomes["late"]) / n_access if n_access else 0.0,  # the definition above
            # of which reuse: found because it had been used before (prefetches' first uses excluded)
            "reuse_rate": (outcomes["hit"] + outcomes["late"] - used) / n_access if n_access else 0.0,
            "hit_rate_per_layer": self._hit_rate_per_layer(),
            "prefetch": {"issued": ev["issued"], "used": used, "wasted": ev["wasted"], "cancelled": ev["cancelled"],
                         "precision": used / ev["issued"] if ev["issued"] else 0.0,
                         "recall": used / (used + misses) if used + misses else 0.0},
            "stall_ms_per_token": 1e3 * stall_decode / n_tok if n_tok else 0.0,
            "stall_s": sum(t1 - t0 for *_, t0, t1 in self.stalls),
            "layer_ms": 1e3 * sum(decode_layers) / len(decode_layers) if decode_layers else 0.0,
            "stall_ms_per_layer": 1e3 * stall_decode / len(decode_layers) if decode_layers else 0.0,
            "forward_ms": 1e3 * decode_s / n_tok if n_tok else 0.0,  # a decode pass without the output head
            "expert_reads": len(reads),
            "preads": sum(len(j.ranges) for j in reads),
            "read_bytes": read_bytes,
            "reads_per_token": _per_token(reads, decode_ids, len, n_tok),
            "bytes_per_token": _per_token(reads, decode_ids, lambda js: sum(j.nbytes for j in js), n_tok),
            "read_latency_ms": {"p50": 1e3 * lat[len(lat) // 2] if lat else 0.0,
                                "p99": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0},
            "read_gbps_wall": read_bytes / wall / 1e9 if wall else 0.0,  # over the profiled passes
            "read_gbps_busy": read_bytes / busy / 1e9 if busy else 0.0,  # while any read was in flight
            "disk_busy_fraction": busy / wall if wall else 0.0,
        }
        if disk_gbps:
            out["disk_gbps"] = disk_gbps
            out["read_vs_disk"] = out["read_gbps_wall"] / disk_gbps
        if n_slots:
            trace = self.access_trace()
            opt = belady_hits(trace, n_slots) / len(trace) if trace else 0.0
            out["cache_slots"] = n_slots
            out["belady_hit_rate"] = opt
            out["reuse_vs_belady"] = out["reuse_rate"] / opt if opt else 0.0
            if with_sweep:
                caps = sweep_capacities or sorted({max(1, int(n_slots * s)) for s in (0.25, 0.5, 1, 2, 4)})
                out["sweep"] = sweep(trace, caps, tuple(POLICIES)) if trace else []
        return out

    def _hit_rate_per_layer(self) -> dict[int, float]:
        found, total = defaultdict(int), defaultdict(int)
        for _, layer, _, outcome in self.accesses:
            total[layer] += 1
            found[layer] += outcome != "miss"
        return {layer: found[layer] / total[layer] for layer in sorted(total)}


def _union_seconds(spans) -> float:
    """Total length of the union of [t0, t1] intervals."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 <= end:
            continue
        total += t1 - max(t0, end)
        end = t1
    return total


def _per_token(reads, decode_ids, measure, n_tok) -> float:
    """measure(reads queued during decode passes) / decode tokens; reads are matched to passes by
    their queue time."""
    if not n_tok:
        return 0.0
    return measure([j for j in reads if getattr(j, "forward", -1) in decode_ids]) / n_tok
