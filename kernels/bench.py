"""Kernel throughput, reported relative to this machine's measured memory read bandwidth.

A matrix-vector product on quantized weights reads every weight byte once and does little
arithmetic per byte, so its ceiling is the memory read bandwidth: `memory_bandwidth()` measures
that ceiling with plain NumPy, and `bench_matmul()` reports the weight bytes a kernel streams per
second as a fraction of it (DESIGN.md, habit 8). Timings live here and in bench/, never in asserts.

    results = run_suite(quick=True)          # Q2_K, the dense shapes, every backend that exists
    print(format_table(results)); save_results(results, "bench/kernels.json")

`kernels` knows nothing about models: nothing here imports `engine`.
"""
from __future__ import annotations

import datetime
import inspect
import itertools
import json
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import QTensor, dequantize, formats, matmul
from .blas import blas_threads
from .reference import random_raw

# ---- what to measure ---------------------------------------------------------------------------
# W[rows, cols]; x @ W.T maps cols -> rows. Dense: a 7-8B model's FFN (4096 <-> 14336). MoE
# experts: 30B-A3B-like (2048 <-> 768), and wider experts (4096 <-> 1536, 4096 <-> 1024).
SHAPES = ((14336, 4096), (4096, 14336),
          (768, 2048), (2048, 768),
          (1536, 4096), (4096, 1536),
          (1024, 4096), (4096, 1024))
TYPES = ("Q2_K", "Q4_K", "Q6_K", "Q3_K", "Q8_0", "Q4_1", "Q4_0")  # Q2_K: the expert type we stream
NS = (1, 8, 64, 512)  # 1: decode; 8 / 64: a few tokens through one expert; 512: a prefill batch
THREADS = (1, 2)
BACKENDS = ("cython", "numba", "numpy", "amx")

# --quick: the headline figures (the dense Q2_K shapes of DESIGN.md's "Figures to beat", plus one
# expert shape) in about a minute on the NumPy path.
QUICK = dict(types=("Q2_K",), shapes=((14336, 4096), (4096, 14336), (768, 2048)), ns=(1, 64),
             threads_list=THREADS, backends=BACKENDS)

# Cold weights: a case cycles over copies of W spanning this many bytes, 4x this machine's 32 MiB L3,
# so each call reads W from memory as decode does (an expert's 0.5 MiB would otherwise sit in L2).
COLD_BYTES = 128 << 20
_MATMUL_HAS_OUT = "out" in inspect.signature(matmul).parameters  # lets the fused kernels skip an alloc


# ---- the machine -------------------------------------------------------------------------------
def machine_info() -> dict:
    """What a result was measured on: the CPU, the cores we may use, the load others put on it."""
    cpu = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())  # the first core's fields
    except OSError:  # pragma: no cover - non-Linux
        pass
    flags = cpu.get("flags", "").split()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return {"cpu": cpu.get("model name") or platform.processor() or "unknown", "cores": cores,
            "cpu_count": os.cpu_count(), "avx512": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg": os.getloadavg(), "python": platform.python_version(), "numpy": np.__version__}


def memory_bandwidth(threads: int = 1, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best memory read bandwidth in bytes/s: `threads` threads each reduce their own slice of a
    float32 buffer far larger than the last-level cache. This is the ceiling the kernels' weight
    bytes/s are compared with.

    The reduction is np.max, not sum: NumPy's pairwise float sum is compute-bound on one core
    (about 20 GB/s here) while max vectorizes to one compare per vector and reaches the memory's
    rate (about 30 GB/s). NumPy releases the GIL inside the reduction, so threads run in parallel.
    """
    if threads < 1 or repeats < 1:
        raise ValueError(f"memory_bandwidth: threads and repeats must be >= 1, got {threads}, {repeats}")
    n = max(threads * 1024, size_bytes // 4)
    buf = np.ones(n, dtype=np.float32)  # written once, so the timed passes see no first-touch faults
    slices = np.array_split(buf, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, slices))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


# ---- one kernel, one shape ---------------------------------------------------------------------
def as_qtype(qtype) -> formats.T:
    """A GGMLQuantizationType from the enum, its value, or its name ("Q2_K")."""
    if isinstance(qtype, str):
        try:
            qtype = formats.T[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type {qtype!r}") from None
    return formats.as_qtype(qtype)


def random_qtensor(qtype, rows: int, cols: int, seed: int = 0) -> QTensor:
    """Valid random blocks: the values do not matter to the speed, only the bytes read."""
    qt = as_qtype(qtype)
    return QTensor(qt, (rows, cols), random_raw(qt, rows, cols, np.random.default_rng(seed)))


def backend_status(backend: str, qtype, threads: int = 1) -> str:
    """"ok", or "n/a: why" when `backend` cannot multiply `qtype` here: it raises, or it silently
    falls back to dequantize + NumPy (whose bits it then matches exactly; a fused kernel adds in
    another order and does not). A tiny probe, so a suite skips the case instead of timing a copy."""
    qt = random_qtensor(qtype, 16, 512, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 512), dtype=np.float32)
    try:
        y = matmul(x, qt, threads=threads, backend=backend)
    except (NotImplementedError, ValueError, ImportError, TypeError) as e:
        return f"n/a: {type(e).__name__}: {e}"
    if backend not in ("numpy", "auto") and np.array_equal(y, x @ dequantize(qt).T):
        return "n/a: falls back to dequantize + NumPy"
    return "ok"


def matmul_caller(qt: QTensor, x: np.ndarray, threads: int, backend: str, cold: bool = True):
    """(fn, working set bytes): fn() computes x @ W.T into a preallocated output (when matmul
    takes one); with cold, each call uses the next of several copies of W (see COLD_BYTES)."""
    copies = min(256, -(-COLD_BYTES // qt.nbytes)) if cold else 1
    weights = [qt] + [QTensor(qt.qtype, qt.shape, qt.data.copy()) for _ in range(copies - 1)]
    kw = dict(threads=threads, backend=backend)
    if _MATMUL_HAS_OUT:
        kw["out"] = np.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
    turn = itertools.cycle(weights)
    return (lambda: matmul(x, next(turn), **kw)), copies * qt.nbytes


def _time(fn, repeats: int, min_time: float, max_time: float) -> tuple[float, int]:
    """Best seconds per call over up to `repeats` runs of `calls` calls, each run lasting >= min_time;
    fewer runs when they would take more than max_time in all (a 10 s case needs no five)."""
    fn()  # warm-up: Numba compiles on first call; first touches of buffers fault pages in
    t0 = time.perf_counter()
    fn()
    best = time.perf_counter() - t0
    calls = max(1, math.ceil(min_time / best)) if best > 0 else 1000
    repeats = max(1, min(repeats, int(max_time // (best * calls)))) if best > 0 else repeats
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best, calls


def bench_matmul(qtype, rows: int, cols: int, n: int, threads: int, backend: str, repeats: int = 5,
                 min_time: float = 0.2, *, max_time: float = 5.0, cold: bool = True,
                 bandwidth: float | None = None, qt: QTensor | None = None, status: str | None = None) -> dict:
    """Time x[n, cols] @ W[rows, cols].T on random `qtype` blocks, read from memory (cold, the
    default) or from cache (cold=False). A case the backend cannot run gets status "n/a: ..." and
    None figures instead of raising. `bandwidth` (bytes/s, for this thread count) fills
    bandwidth_fraction; `qt` / `status` let a suite reuse weights and probes."""
    qtype = as_qtype(qtype)
    qt = qt if qt is not None else random_qtensor(qtype, rows, cols)
    assert qt.shape == (rows, cols) and qt.qtype == qtype, "qt does not match qtype / rows / cols"
    result = {"qtype": qtype.name, "shape": [rows, cols], "n": n, "threads": threads, "backend": backend,
              "nbytes": qt.nbytes, "status": status or backend_status(backend, qtype, threads),
              "seconds": None, "calls": None, "weights_per_s": None, "weight_bytes_per_s": None,
              "gflops": None, "bandwidth_fraction": None, "cold": cold, "working_set_bytes": None}
    if backend == "auto":  # which kernel auto picked, so the row can be read
        try:
            from . import backends
            result["backend"] = f"auto:{backends.choose(qtype, n)}"
        except (ImportError, AttributeError):  # pragma: no cover - before the backend registry
            pass
    if result["status"] != "ok":
        return result
    x = np.random.default_rng(3).standard_normal((n, cols), dtype=np.float32)  # fixed x
    fn, result["working_set_bytes"] = matmul_caller(qt, x, threads, backend, cold)
    try:
        with blas_threads(threads):
            seconds, calls = _time(fn, repeats, min_time, max_time)
    except (NotImplementedError, ValueError) as e:  # e.g. a kernel that only takes some n
        result["status"] = f"n/a: {type(e).__name__}: {e}"
        return result
    result.update(seconds=seconds, calls=calls, weights_per_s=rows * cols / seconds,
                  weight_bytes_per_s=qt.nbytes / seconds, gflops=2 * n * rows * cols / seconds / 1e9)
    if bandwidth:
        result["bandwidth_fraction"] = result["weight_bytes_per_s"] / bandwidth
    return result


# ---- a suite -----------------------------------------------------------------------------------
def run_suite(types=None, shapes=None, ns=None, threads_list=None, backends=None, quick: bool = False, *,
              repeats: int | None = None, min_time: float | None = None, max_time: float | None = None,
              cold: bool = True, bandwidth_bytes: int | None = None, progress=None) -> dict:
    """Every (type, shape, n, threads, backend) case, with the machine and its bandwidth for each
    thread count measured in the same run. None arguments take the full defaults (QUICK's with
    quick=True). progress: called with each finished case (e.g. to print it)."""
    base = QUICK if quick else dict(types=TYPES, shapes=SHAPES, ns=NS, threads_list=THREADS, backends=BACKENDS)
    types, shapes, ns = types or base["types"], shapes or base["shapes"], ns or base["ns"]
    threads_list, backends = threads_list or base["threads_list"], backends or base["backends"]
    repeats = repeats or (3 if quick else 5)
    min_time = min_time if min_time is not None else (0.05 if quick else 0.2)
    max_time = max_time if max_time is not None else (2.0 if quick else 5.0)
    bandwidth_bytes = bandwidth_bytes or ((256 << 20) if quick else (1 << 30))

    machine = machine_info()
    # best of many cheap passes, before and after the cases: a neighbour's burst on this shared
    # machine must not lower the yardstick (it would inflate every fraction)
    bandwidth = {str(t): memory_bandwidth(t, bandwidth_bytes, 10) for t in threads_list}
    results = []
    for qtype in types:
        qtype = as_qtype(qtype)
        status = {(b, t): backend_status(b, qtype, t) for b in backends for t in threads_list}
        for rows, cols in shapes:
            qt = random_qtensor(qtype, rows, cols)
            for n in ns:
                for t in threads_list:
                    for b in backends:
                        r = bench_matmul(qtype, rows, cols, n, t, b, repeats, min_time, max_time=max_time,
                                         cold=cold, bandwidth=bandwidth[str(t)], qt=qt, status=status[b, t])
                        results.append(r)
                        if progress:
                            progress(r)
    machine["loadavg_after"] = os.getloadavg()
    bandwidth_after = {str(t): memory_bandwidth(t, bandwidth_bytes, 10) for t in threads_list}
    for t, bw in bandwidth_after.items():
        bandwidth[t] = max(bandwidth[t], bw)
        for r in results:
            if str(r["threads"]) == t and r["weight_bytes_per_s"]:
                r["bandwidth_fraction"] = r["weight_bytes_per_s"] / bandwidth[t]
    return {"machine": machine, "bandwidth": bandwidth, "bandwidth_bytes": bandwidth_bytes,
            "repeats": repeats, "min_time": min_time, "max_time": max_time, "cold": cold, "results": results}


def format_row(r: dict) -> str:
    """One markdown table row (see format_table); a case that did not run says why in `note`."""
    head = f"| {r['qtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['n']} | {r['threads']} | {r['backend']} |"
    if r["status"] != "ok":
        return head + f" n/a | | | | | {r['status'].removeprefix('n/a: ')[:70]} |"
    frac = f"{100 * r['bandwidth_fraction']:.0f}%" if r["bandwidth_fraction"] else ""
    return head + (f" {1e3 * r['seconds']:.3f} | {r['weights_per_s'] / 1e9:.2f} | "
                   f"{r['weight_bytes_per_s'] / 1e9:.2f} | {frac} | {r['gflops']:.1f} | |")


TABLE_HEADER = ("| type | shape (rows x cols) | n | threads | backend | ms | G weights/s | GB/s | % of bandwidth "
                "| GFLOP/s | note |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---|")


def machine_lines(m: dict) -> list[str]:
    """The machine, the date and its load; a warning when other processes share the cores."""
    after = m.get("loadavg_after", m["loadavg"])[0]
    lines = [f"{m['cpu']}, {m['cores']} cores, {m['date']}, load {m['loadavg'][0]:.2f} (after: {after:.2f})"]
    if max(m["loadavg"][0], after) >= 0.5 * m["cores"]:
        # an OpenMP / OpenBLAS thread that waits at a barrier for a preempted sibling loses a
        # scheduler tick: on a shared core a 2-thread figure can be 10-100x too slow
        lines.append(f"WARNING: load {max(m['loadavg'][0], after):.1f} on {m['cores']} cores: other processes "
                     "share the CPU; multi-thread figures are unreliable (1-thread ones less so)")
    return lines


def format_table(results: dict) -> str:
    """Markdown: the machine and its bandwidth, then one row per case. GB/s counts the weight
    bytes (the quantity bounded by memory bandwidth); GFLOP/s matters once n is large."""
    bw = ", ".join(f"{t} thread{'s' if t != '1' else ''}: {v / 1e9:.1f} GB/s" for t, v in results["bandwidth"].items())
    weights = ("cold: each call reads W from memory" if results.get("cold", True)
               else "warm: W may be cache-resident, so small shapes can beat the bandwidth")
    lines = machine_lines(results["machine"]) + [f"memory read bandwidth: {bw}; weights {weights}", "",
                                                 TABLE_HEADER]
    lines += [format_row(r) for r in results["results"]]
    return "\n".join(lines)


def save_results(results: dict, path_json) -> Path:
    path = Path(path_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# ---- the measured choice for backend="auto" ----------------------------------------------------
# "auto" keeps the Cython kernels unless another backend's geometric mean time is below theirs by
# more than this factor: Numba's kernels compile on their first call (seconds, once per process)
# and pay a dispatch per call, so a win within the noise of one table run is not worth them.
_PREFERRED, _PREFERRED_MARGIN = "cython", 1.15


def best_backends(results: dict) -> dict[str, dict[str, str]]:
    """{type: {n: backend}}: per type and batch size, the backend with the least geometric mean
    time over the shapes measured, at the largest thread count measured (the engine's default:
    every core); Cython unless the best beats it by more than _PREFERRED_MARGIN (15%). Only
    backends that ran every shape of that (type, n) compete. The geometric mean weighs every
    shape alike: a sum of seconds is the largest shape's verdict, and a MoE decode step is mostly
    small expert matrices, where a backend's per-call cost shows (the 2026-12-02 table gave Q4_0
    decode to Numba by 4-10% on 14336x4096, where it was 1.6x slower on 768x2048 and a small
    model ran 25% slower for it)."""
    rows = [r for r in results["results"] if not r["backend"].startswith("auto")]
    if not rows:
        return {}
    threads = max(r["threads"] for r in rows)
    log_secs: dict[tuple[str, int], dict[str, list]] = {}
    for r in rows:
        if r["threads"] == threads:
            secs = r["seconds"]
            log_secs.setdefault((r["qtype"], r["n"]), {}).setdefault(r["backend"], []).append(
                None if secs is None else math.log(max(secs, 1e-12)))
    best: dict[str, dict[str, str]] = {}
    for (qtype, n), by_backend in sorted(log_secs.items()):
        mean_log = {b: sum(logs) / len(logs) for b, logs in sorted(by_backend.items()) if None not in logs}
        if not mean_log:
            continue
        choice = min(mean_log, key=mean_log.get)
        if _PREFERRED in mean_log and mean_log[_PREFERRED] - mean_log[choice] <= math.log(_PREFERRED_MARGIN):
            choice = _PREFERRED
        best.setdefault(qtype, {})[str(n)] = choice
    return best


def write_backend_table(results: dict) -> Path:
    """Store best_backends(results) where weightstream.kernels.backends.choose reads it: this CPU model's
    table in the user's cache (backends.user_table_path()); returns its path."""
    from . import backends

    keep = ("qtype", "shape", "n", "threads", "backend", "seconds", "weight_bytes_per_s")
    measurements = [{k: r[k] for k in keep} for r in results["results"] if r["status"] == "ok"]
    return backends.write_table(best_backends(results), measurements, results["machine"])
