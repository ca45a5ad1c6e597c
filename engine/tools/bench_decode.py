"""Prefill and decode speed of a model, measured as llama-bench does.

pp<N>: one forward pass of N random token ids from an empty cache (prompt processing);
tg<N>: N single-token forward passes from an empty cache (text generation). Random ids, as
llama-bench uses: the speed does not depend on them, and no tokenizer or sampler time is counted.
Each figure is the mean +- sample standard deviation of the tokens/s of `repeats` runs, as
llama-bench reports avg_ts +- stddev_ts; the best run is kept too (pp_tok_s_best, tg_tok_s_best).
Each test first runs once untimed, whole (as llama-bench's warm-up run): its first call pays for
Numba's compilation of every kernel and batch shape it meets and for the first touches of the
weights, which timed as a run made `--backend numba` report 0.7 tok/s prefill. That run's seconds
are reported apart (pp_warmup_s, tg_warmup_s), never in the figures.

NumPy's BLAS runs on one thread inside every forward pass (Model.forward, kernels/blas.py), so a
1-thread figure is comparable with llama.cpp -t 1.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...kernels import default_threads
from ...kernels.bench import machine_info, machine_lines

from ..runtime.engine import PREFILL_BATCH, Engine


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(seconds of a first, untimed warm-up call of fn, [seconds of each of `repeats` calls after it])."""
    t0 = time.perf_counter()
    fn()
    warmup = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return warmup, runs


def _rate(tokens: int, runs: list[float]) -> dict:
    """llama-bench's figures for one test: mean and sample standard deviation of tokens/s over the
    runs (0 for one run), and the best run's."""
    if not runs or not tokens:
        return {"tok_s": None, "tok_s_sd": None, "tok_s_best": None}
    rates = np.array([tokens / s for s in runs])
    return {"tok_s": float(rates.mean()), "tok_s_sd": float(rates.std(ddof=1)) if len(rates) > 1 else 0.0,
            "tok_s_best": float(rates.max())}


def bench_decode(model_path, prompt_tokens: int = 64, gen_tokens: int = 64, threads: int | None = None,
                 backend: str = "auto", repeats: int = 3, seed: int = 0) -> dict:
    """{pp_tok_s, tg_tok_s, load_s, ...} for the model at model_path. prompt_tokens or gen_tokens
    of 0 skips that test (its figures are None)."""
    if prompt_tokens < 0 or gen_tokens < 0 or repeats < 1:
        raise ValueError("bench_decode: prompt_tokens and gen_tokens must be >= 0 and repeats >= 1")
    threads = threads or default_threads()
    machine = machine_info()  # before we add our own load
    with Engine.load(model_path, threads=threads, backend=backend) as engine:
        model, cfg = engine.model, engine.config
        if max(prompt_tokens, gen_tokens) > model.n_ctx:
            raise ValueError(f"bench_decode: {max(prompt_tokens, gen_tokens)} tokens exceed n_ctx={model.n_ctx}")
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, cfg.n_vocab, prompt_tokens)
        gen = rng.integers(0, cfg.n_vocab, gen_tokens)

        def prefill():
            for s in range(0, prompt_tokens, PREFILL_BATCH):  # the batches Engine.generate uses
                model.forward(prompt[s:s + PREFILL_BATCH], s)

        def decode():
            for pos, token in enumerate(gen):
                model.forward(token[None], pos)

        pp_warmup, pp_runs = _timed(prefill, repeats) if prompt_tokens else (None, [])
        tg_warmup, tg_runs = _timed(decode, repeats) if gen_tokens else (None, [])
        info = dict(arch=cfg.arch, n_layer=cfg.n_layer, n_vocab=cfg.n_vocab)
    pp, tg = _rate(prompt_tokens, pp_runs), _rate(gen_tokens, tg_runs)
    return {"model": os.path.basename(str(model_path)), "path": str(model_path),
            "size_bytes": os.path.getsize(model_path), **info, "threads": threads, "backend": backend,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats,
            "load_s": engine.load_s, **{f"pp_{k}": v for k, v in pp.items()}, **{f"tg_{k}": v for k, v in tg.items()},
            "pp_runs": pp_runs, "tg_runs": tg_runs, "pp_warmup_s": pp_warmup, "tg_warmup_s": tg_warmup,
            "machine": machine}


DECODE_HEADER = ("| model | size | threads | backend | test | t/s (mean ± sd) | ms/token |\n"
                 "|---|---:|---:|---|---|---:|---:|")


def format_decode_rows(r: dict) -> list[str]:
    head = f"| {r['model']} | {r['size_bytes'] / 2**20:.0f} MiB | {r['threads']} | {r['backend']} |"
    rows = []
    for test, key in ((f"pp{r['prompt_tokens']}", "pp"), (f"tg{r['gen_tokens']}", "tg")):
        tok_s, sd = r[f"{key}_tok_s"], r[f"{key}_tok_s_sd"]
        if tok_s:
            rows.append(f"{head} {test} | {tok_s:.2f} ± {sd:.2f} | {1e3 / tok_s:.2f} |")
    return rows


def format_decode(result) -> str:
    """A llama-bench-like markdown table for one result or a list of them (e.g. one per thread count)."""
    results = [result] if isinstance(result, dict) else list(result)
    loads = ", ".join(f"{r['load_s']:.2f} s" for r in results)
    warm = ", ".join(f"{k} {r[f'{k}_warmup_s']:.2f} s" for r in results for k in ("pp", "tg")
                     if r.get(f"{k}_warmup_s") is not None)
    lines = machine_lines(results[0]["machine"]) + [f"model load time: {loads}"]
    if warm:
        lines.append(f"first-call warm-up, not in the figures: {warm}")
    lines += ["", DECODE_HEADER]
    for r in results:
        lines += format_decode_rows(r)
    return "\n".join(lines)
