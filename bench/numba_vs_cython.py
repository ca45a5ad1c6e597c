"""Numba SIMD k-quant kernels against the Cython ones (issue 15): one thread, weights warm.

    python bench/numba_vs_cython.py [--types Q4_K,Q6_K] [--repeat 5]

Per type, shape (rows, cols) and activation rows n: the best of `repeat` calls of
kernels.matmul(x, qt, threads=1, backend=...) after a warm-up call (JIT compile or cache load,
weights pulled into cache/memory), both backends timed the same way (activation quantization
included). Prints type, shape, n, numba us, cython us, ratio (numba / cython).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from weightstream import kernels
from weightstream.kernels import reference

SHAPES = ((4096, 14336), (14336, 4096))
NS = (1, 8)


def best_us(x, qt, backend, repeat):
    kernels.matmul(x, qt, threads=1, backend=backend)  # warm-up: JIT / cache load, weights warm
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        kernels.matmul(x, qt, threads=1, backend=backend)
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'type':6} {'shape':>12} {'n':>3} {'numba us':>10} {'cython us':>10} {'ratio':>6}", flush=True)
    for name in args.types.split(","):
        qtype = T[name]
        for rows, cols in SHAPES:
            qt = kernels.QTensor(qtype, (rows, cols), reference.random_raw(qtype, rows, cols, rng))
            for n in NS:
                x = rng.standard_normal((n, cols)).astype(np.float32)
                nb = best_us(x, qt, "numba", args.repeat)
                cy = best_us(x, qt, "cython", args.repeat)
                print(f"{name:6} {rows:>5}x{cols:<6} {n:>3} {nb:>10.0f} {cy:>10.0f} {nb / cy:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
