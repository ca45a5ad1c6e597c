"""Where a MoE decode step's milliseconds go: cProfile over decode steps, grouped by component.

    python bench/decode_breakdown.py MODEL.gguf [--steps 16] [--threads 2] [--blas-pool]

After a 16-token prefill and two warm-up steps, `--steps` single-token forward passes run under
cProfile; the step's time is split into the routed experts (fused_experts / expert_batch /
expert_ffn, kernels included), the fused matmuls of the resident quantized weights (attention or
linear-attention projections, shared experts, the head, and the F32 routers: KernelCache.matmul),
F32 matmuls through NumPy (where no float kernel: Linear.__call__'s own time), routing (router + softmax + top-k), the Gated DeltaNet layer's own
time (conv, delta rule, gated norm; hybrids), and the output head. cProfile adds its own cost per
Python call, so the profiled ms/token is a little above an unprofiled run's.

--blas-pool leaves NumPy's BLAS on its own thread pool inside the forward pass, as before
kernels/blas.py (the "before" of that change).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import time


def breakdown(model: str, steps: int = 16, threads: int = 2, blas_pool: bool = False, top: int = 0) -> dict:
    import weightstream.engine.model.forward as forward
    from weightstream.engine.runtime.engine import Engine

    if blas_pool:
        forward.one_blas_thread = contextlib.nullcontext
    with Engine.load(model, n_ctx=256, threads=threads) as eng:
        m = eng.model
        m.forward(list(range(100, 116)), 0)
        for j in range(2):
            m.forward([5 + j], 16 + j)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for j in range(steps):
            m.forward([7 + j], 18 + j)
        prof.disable()
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
    if top:  # the functions that spend the most time of their own, for what the groups below miss
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)

    def ms(match, cumulative: bool = False) -> float:
        return sum(v[3] if cumulative else v[2] for k, v in stats.items() if match(*k)) / steps * 1e3

    return {
        "model": model, "threads": threads, "blas_pool": blas_pool, "ms_per_token": wall_ms,
        "layers": ms(lambda f, _, n: n == "run_layers", True),
        "experts": ms(lambda f, _, n: n in ("fused_experts", "expert_batch", "expert_ffn"), True),
        "quantized_matmuls": ms(lambda f, _, n: n == "matmul" and f.endswith("backends.py")),
        "f32_matmuls": ms(lambda f, _, n: n == "__call__" and f.endswith("weights.py")),
        "routing": ms(lambda f, _, n: n == "route", True),
        "linear_attention_own": ms(lambda f, _, n: n == "linear_attention"),
        "head": ms(lambda f, _, n: n == "head", True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--blas-pool", action="store_true", help="NumPy's BLAS on its own pool (before kernels/blas.py)")
    ap.add_argument("--top", type=int, default=0, metavar="N", help="also print the N functions with the most own time")
    args = ap.parse_args(argv)
    r = breakdown(args.model, args.steps, args.threads, args.blas_pool, args.top)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
