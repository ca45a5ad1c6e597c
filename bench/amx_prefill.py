"""Prefill products of the k-quants: the "amx" backend (AMX-BF16 tiles) beside "cython" (the Q8_K
kernels, int8 AMX tiles for Q2_K) and "numpy" (dequantize + BLAS sgemm), in one run.

    python bench/amx_prefill.py [--threads 1 2] [--repeats 3]

Shapes: the Qwen3.5-35B-A3B-shaped file's Q4_K projections (the Gated DeltaNet in_proj 12352 x
2048, the attention / ssm output 2048 x 4096, q/k/v 9216 x 2048) and a Q2_K expert's gate and
down (512 x 2048, 2048 x 512), Q6_K's head shape cut to 4096 rows; n = 16 (an expert's share
of a prompt), 64 and 512 (a prompt). Weights are random blocks with finite scales, warm in
cache after the first call (these products are compute-bound). Best of `repeats` calls, ms, and
the ratio of each to amx. NumPy's BLAS is held to the thread count measured, and each backend
starts after a pause: a pool's threads spin for a while after a call, and on 2 cores a spinning
BLAS thread made the next kernel's 2-thread figure up to 10x slower.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from weightstream.kernels import QTensor, backends, reference
from weightstream.kernels.bench import machine_info
from weightstream.kernels.blas import blas_threads

CASES = [(T.Q4_K, 12352, 2048), (T.Q4_K, 2048, 4096), (T.Q4_K, 9216, 2048), (T.Q6_K, 4096, 2048),
         (T.Q2_K, 512, 2048), (T.Q2_K, 2048, 512)]
NS = (16, 64, 512)


def best_ms(fn, repeats: int) -> float:
    fn()  # warm: first-touch of the output, the kernel's first call
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if not backends.REGISTRY["amx"].supports(T.Q4_K):
        raise SystemExit("amx_prefill: no AMX-BF16 here (the amx backend offers no types)")
    m = machine_info()
    print(f"# {m['cpu']}, {m['cores']} cores, {m['date']}")
    print("| type | rows x cols | n | threads | amx ms | cython ms | numpy ms | cython / amx | numpy / amx |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for qtype, rows, cols in CASES:
        qt = QTensor(qtype, (rows, cols), np.ascontiguousarray(reference.random_raw(qtype, rows, cols, rng)))
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            out = np.empty((n, rows), np.float32)
            for t in args.threads:
                ms = {}
                for name in ("amx", "cython", "numpy"):
                    cache = backends.KernelCache(name)
                    time.sleep(0.3)  # the previous pool's threads done spinning
                    with blas_threads(t):
                        ms[name] = best_ms(lambda: cache.matmul(x, qt, t, out), args.repeats)
                print(f"| {qtype.name} | {rows} x {cols} | {n} | {t} | {ms['amx']:.2f} | {ms['cython']:.2f} | "
                      f"{ms['numpy']:.2f} | {ms['cython'] / ms['amx']:.2f} | {ms['numpy'] / ms['amx']:.2f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
