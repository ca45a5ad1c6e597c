"""The server's figures, one snapshot for both readers: /v1/stats (JSON, the page polls it) and
/metrics (Prometheus text). Sources: the worker's counters (serve/worker.py), the engine's last
generation (Engine.last_stats), the expert store's totals since load (ExpertStore.summary) and the
profiler's figures for the generation running now or last (Profiler.summary, engine/observe/;
the worker clears its records when a generation starts, so they stay one generation long).

A snapshot costs a pass over one generation's profiler records: the app computes it in a thread,
never on the event loop."""
from __future__ import annotations

import time

_PROFILE_KEYS = ("hit_rate", "stall_ms_per_token", "bytes_per_token", "read_gbps_wall", "decode_passes",
                 "hit_rate_per_layer")


def snapshot(engine, worker, model_id: str) -> dict:
    last = engine.last_stats
    running = worker.running
    out = {
        "model": model_id, "time": time.time(), "n_ctx": engine.model.n_ctx,
        "queue_depth": worker.waiting, "max_queue": worker.max_queue, "generating": running is not None,
        "generations": worker.generations, "cancelled": worker.cancelled, "rejected": worker.rejected,
        "generated_tokens_total": worker.generated_tokens + (last.generated_tokens if running else 0),
        # the generation running now, else the last one
        "tokens_per_second": last.decode_tok_s, "prefill_tokens_per_second": last.prefill_tok_s,
        "time_to_first_token_s": _ttft(worker), "ttft_sum_s": worker.ttft_sum, "ttft_count": worker.ttft_count,
    }
    if engine.plan is not None:
        out["memory"] = engine.plan.summary()
    if engine.store is not None:  # totals since load
        out["experts"] = engine.store.summary()
    if engine.profiler is not None:
        s = engine.profiler.summary(with_sweep=False)  # no n_slots: Belady's replay is not wanted here
        out["generation"] = {k: s[k] for k in _PROFILE_KEYS}
    return out


def _ttft(worker) -> float | None:
    """Seconds from the request's arrival (queue wait included: what a client sees) to its first
    text, for the running job once it has one, else the last finished job that had one."""
    for job in [worker.running, *reversed(worker.finished)]:
        if job is not None and job.t_first is not None:
            return job.t_first - job.t_queued
    return None


# name, type, help, key path in the snapshot
_METRICS = [
    ("weightstream_queue_depth", "gauge", "requests waiting for the engine (the running one not counted)", ("queue_depth",)),
    ("weightstream_generating", "gauge", "1 while a generation runs", ("generating",)),
    ("weightstream_generations_total", "counter", "generations run (cancelled ones included)", ("generations",)),
    ("weightstream_cancelled_total", "counter", "requests cancelled because the client went away", ("cancelled",)),
    ("weightstream_rejected_total", "counter", "requests refused with 503 because the queue was full", ("rejected",)),
    ("weightstream_generated_tokens_total", "counter", "tokens generated", ("generated_tokens_total",)),
    ("weightstream_tokens_per_second", "gauge", "decode tokens per second of the running or last generation",
     ("tokens_per_second",)),
    ("weightstream_prefill_tokens_per_second", "gauge", "prompt tokens per second of the running or last generation",
     ("prefill_tokens_per_second",)),
    ("weightstream_last_time_to_first_token_seconds", "gauge",
     "request arrival to first text (queue wait included), running or last request", ("time_to_first_token_s",)),
    ("weightstream_expert_cache_hit_rate", "gauge", "expert accesses found in memory or on their way, since load",
     ("experts", "hit_rate")),
    ("weightstream_expert_cache_hits_total", "counter", "expert accesses found in the cache, since load", ("experts", "hits")),
    ("weightstream_expert_cache_late_total", "counter", "expert accesses found being read by a prefetch, since load",
     ("experts", "late")),
    ("weightstream_expert_cache_misses_total", "counter", "expert accesses read on demand, since load",
     ("experts", "misses")),
    ("weightstream_expert_read_bytes_total", "counter", "bytes of experts read from the file, since load",
     ("experts", "bytes_read")),
    ("weightstream_generation_hit_rate", "gauge", "expert cache hit rate of the running or last generation",
     ("generation", "hit_rate")),
    ("weightstream_stall_ms_per_token", "gauge", "ms per decode token the compute waited for expert reads",
     ("generation", "stall_ms_per_token")),
    ("weightstream_read_bytes_per_token", "gauge", "expert bytes read per decode token",
     ("generation", "bytes_per_token")),
    ("weightstream_read_gbps", "gauge", "expert bytes read per second of forward passes, in GB/s",
     ("generation", "read_gbps_wall")),
]


def prometheus(snap: dict) -> str:
    """The snapshot in Prometheus' text exposition format (version 0.0.4). A figure the engine has
    not (a resident model has no expert figures) is left out rather than reported as 0. Values
    are written with repr: the shortest text that reads back as the same float."""
    lines = []
    for name, kind, help_, path in _METRICS:
        value = snap
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value)!r}"]
    name = "weightstream_time_to_first_token_seconds"  # a summary without quantiles: rate(sum) / rate(count)
    lines += [f"# HELP {name} request arrival to first text, queue wait included", f"# TYPE {name} summary",
              f"{name}_sum {float(snap['ttft_sum_s'])!r}", f"{name}_count {snap['ttft_count']}"]
    layers = snap.get("generation", {}).get("hit_rate_per_layer", {})
    if layers:
        name = "weightstream_layer_hit_rate"
        lines += [f"# HELP {name} expert cache hit rate per layer, running or last generation", f"# TYPE {name} gauge"]
        lines += [f'{name}{{layer="{layer}"}} {float(rate)!r}' for layer, rate in layers.items()]
    return "\n".join(lines) + "\n"
