"""Gated DeltaNet kernels: decode state bandwidth and prefill, recurrent vs chunked.

    python bench/deltanet_bench.py [--threads 1,2] [--n 512] [--quick] [--json out.json]

Decode: `_deltanet.gated_delta_rule_into` on one token, for the two real Qwen3.5 head layouts
(397B-A17B: Hk 16, Hv 64; 35B-A3B: Hk 16, Hv 32; Dk = Dv = 128). One token does little arithmetic
per state byte, so the figure is the state traffic Hv * Dk * Dv * 4 bytes, read twice and written
once, per second (3 x 4 MiB for the 397B layer) -- "state GB/s" -- set beside the memory read
bandwidth measured in the same run (kernels/bench.py). "warm": one state, called again and again
(it stays in L2/L3); "cold": each call takes the next of several states spanning twice the L3
cache (256 MiB at least), as a decode step finds a layer's state after every other layer and the
expert weights have passed through the cache. (The kernel runs 64-column blocks of 32 KiB, so the
second read of each block hits L1: the memory sees about one read and one write, "mem GB/s".)

Prefill: n tokens (512) through one layer's recurrence at the 35B-A3B and 397B shapes, by the
NumPy references token by token (`gated_delta_rule`) and in chunks of 64 (`chunk_gated_delta_rule`,
matrix products on OpenBLAS, pinned to the same thread count), and by the Cython kernel, which
is recurrent. Times are best of a few runs; nothing is asserted (DESIGN.md, habit 8).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from weightstream.kernels import _deltanet
from weightstream.kernels.bench import blas_threads, machine_info, machine_lines, memory_bandwidth
from weightstream.kernels.reference import deltanet as ref

# (name, Hk, Hv, Dk = Dv): the linear-attention layers of the two Qwen3.5 MoE models
SHAPES = (("Qwen3.5-35B-A3B", 16, 32, 128), ("Qwen3.5-397B-A17B", 16, 64, 128))


def l3_bytes() -> int:
    """The last-level cache's size from sysfs (32 MiB when it cannot be read)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
        best = max(best, int(size.rstrip("KM")) * scale)
    return best or 32 << 20


def layer_inputs(n: int, hk: int, hv: int, d: int, seed: int = 0) -> dict:
    """Random q, k, v, g, beta at a layer's scales (values do not change the speed)."""
    rng = np.random.default_rng(seed)
    return dict(q=rng.standard_normal((n, hk, d), dtype=np.float32),
                k=rng.standard_normal((n, hk, d), dtype=np.float32),
                v=rng.standard_normal((n, hv, d), dtype=np.float32),
                g=-rng.uniform(0.01, 1.0, (n, hv)).astype(np.float32),
                beta=rng.uniform(0.1, 0.9, (n, hv)).astype(np.float32))


def best_time(fn, min_time: float = 0.2, repeats: int = 5, min_calls: int = 1) -> float:
    """Best seconds per call: `repeats` runs of enough calls (>= min_calls) to last min_time each,
    after a warm-up."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(min_calls, math.ceil(min_time / once))
    best = once
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def bench_decode(hk: int, hv: int, d: int, threads: int, cold: bool, min_time: float = 0.2) -> dict:
    """One token through gated_delta_rule_into; state GB/s = 3 x state bytes / seconds."""
    x = layer_inputs(1, hk, hv, d)
    state_bytes = hv * d * d * 4
    copies = max(2, -(-max(2 * l3_bytes(), 256 << 20) // state_bytes)) if cold else 1
    states = [np.empty((hv, d, d), np.float32) for _ in range(copies)]
    for st in states:
        st.fill(0.0)  # touched now: np.zeros would leave the pages to fault in inside the timing
    out = np.empty((1, hv, d), np.float32)
    turn = itertools.cycle(states)

    def step():
        _deltanet.gated_delta_rule_into(x["q"], x["k"], x["v"], x["g"], x["beta"], next(turn), out, 1e-6, True,
                                        threads)

    s = best_time(step, min_time, min_calls=copies)  # every run goes once round all the states
    return {"Hk": hk, "Hv": hv, "D": d, "threads": threads, "cold": cold, "state_bytes": state_bytes,
            "seconds": s, "state_GB_s": 3 * state_bytes / s / 1e9, "memory_GB_s": 2 * state_bytes / s / 1e9}


def bench_prefill(hk: int, hv: int, d: int, n: int, threads: int, repeats: int = 2) -> dict:
    """n tokens through one layer: NumPy recurrent, NumPy chunked (64), Cython recurrent."""
    x = layer_inputs(n, hk, hv, d)
    state = np.zeros((hv, d, d), np.float32)
    out = np.empty((n, hv, d), np.float32)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    with blas_threads(threads):
        numpy_rec = best_time(lambda: ref.gated_delta_rule(*args, state.copy(), 1e-6, True), 0, repeats)
        numpy_chunk = best_time(lambda: ref.chunk_gated_delta_rule(*args, state.copy(), 1e-6, True), 0, repeats)
    cython = best_time(lambda: _deltanet.gated_delta_rule_into(*args, state.copy(), out, 1e-6, True, threads),
                       0.2, repeats + 1)
    return {"Hk": hk, "Hv": hv, "D": d, "n": n, "threads": threads, "numpy_recurrent_s": numpy_rec,
            "numpy_chunked_s": numpy_chunk, "cython_recurrent_s": cython}


DECODE_HEADER = (f"{'model':20} {'Hk':>3} {'Hv':>3} {'thr':>3} {'state':>8} {'us warm':>8} {'GB/s':>6} "
                 f"{'us cold':>8} {'GB/s':>6} {'mem GB/s':>8}")
PREFILL_HEADER = (f"{'model':20} {'thr':>3} {'NumPy recurrent':>17} {'NumPy chunked':>17} "
                  f"{'Cython recurrent':>17}  faster NumPy")


def decode_row(name: str, warm: dict, cold: dict) -> str:
    return (f"{name:20} {warm['Hk']:3} {warm['Hv']:3} {warm['threads']:3} {warm['state_bytes'] / 2**20:6.1f}Mi "
            f"{warm['seconds'] * 1e6:8.0f} {warm['state_GB_s']:6.1f} {cold['seconds'] * 1e6:8.0f} "
            f"{cold['state_GB_s']:6.1f} {cold['memory_GB_s']:8.1f}")


def prefill_row(name: str, p: dict) -> str:
    rec, chunk, cy = p["numpy_recurrent_s"], p["numpy_chunked_s"], p["cython_recurrent_s"]
    cols = " ".join(f"{1e3 * t:8.1f} ({p['n'] / t:6.0f})" for t in (rec, chunk, cy))
    faster = f"chunked ({rec / chunk:.1f}x)" if chunk < rec else f"recurrent ({chunk / rec:.1f}x)"
    return f"{name:20} {p['threads']:3} {cols}  {faster}"


def run(threads_list=(1, 2), n: int = 512, quick: bool = False, progress=print) -> dict:
    """Every decode and prefill case; prints each row as it finishes and returns all figures."""
    machine = machine_info()
    bandwidth = {t: memory_bandwidth(t, (256 << 20) if quick else (1 << 30), 10) for t in threads_list}
    progress("\n".join(machine_lines(machine)))
    progress("memory read bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {bw / 1e9:.1f} GB/s"
                                                     for t, bw in bandwidth.items()))
    min_time = 0.05 if quick else 0.2
    progress("\ndecode (n = 1), gated_delta_rule_into. GB/s: 3 x Hv*Dk*Dv*4 bytes (2 reads + 1 write of the\n"
             "state) per token / time. mem GB/s: cold, what reaches memory, 1 read + 1 write per token (the\n"
             "second read hits L1) / time: compare with the read bandwidth above (writes stream alongside)")
    progress(DECODE_HEADER)
    decode = []
    for name, hk, hv, d in SHAPES:
        for t in threads_list:
            warm = dict(bench_decode(hk, hv, d, t, cold=False, min_time=min_time), model=name)
            cold = dict(bench_decode(hk, hv, d, t, cold=True, min_time=min_time), model=name)
            decode += [warm, cold]
            progress(decode_row(name, warm, cold))
    progress(f"\nprefill (n = {n}), one layer's recurrence from a zero state: ms (tokens/s)")
    progress(PREFILL_HEADER)
    prefill = []
    for name, hk, hv, d in SHAPES:
        for t in threads_list:
            p = dict(bench_prefill(hk, hv, d, n, t, repeats=1 if quick else 2), model=name)
            prefill.append(p)
            progress(prefill_row(name, p))
    machine["loadavg_after"] = os.getloadavg()
    progress("\n".join(machine_lines(machine)[1:]))
    return {"machine": machine, "bandwidth": {str(t): bw for t, bw in bandwidth.items()}, "decode": decode,
            "prefill": prefill}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--n", type=int, default=512, help="prefill tokens")
    ap.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = run(tuple(int(t) for t in args.threads.split(",")), args.n, args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
