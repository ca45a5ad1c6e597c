"""Kernel and decode benchmarks (pytest-benchmark). Not part of `pytest` (testpaths = tests/):

    python -m pytest bench/ --benchmark-only [--benchmark-json bench/out.json]

Each kernel case records GB/s of weight bytes and the fraction of the measured memory bandwidth in
extra_info; cases a backend cannot run here are skipped, so this runs before and after every
fused kernel lands. The full grid is `weightstream bench kernels`; this is its reduced, tracked set.
"""
import numpy as np
import pytest

from weightstream.kernels.bench import backend_status, matmul_caller, random_qtensor
from weightstream.kernels.blas import blas_threads

SHAPES = [(14336, 4096), (4096, 14336)]  # W rows x cols: the dense FFN of DESIGN.md's figures
CASES = [(qtype, shape, n, threads, backend)
         for qtype in ("Q2_K",) for shape in SHAPES for n in (1, 512) for threads in (1, 2)
         for backend in ("cython", "numba", "numpy")]

_weights = {}  # (qtype, shape) -> QTensor: random blocks are made once per session


def _id(case):
    qtype, (rows, cols), n, threads, backend = case
    return f"{qtype}-{rows}x{cols}-n{n}-t{threads}-{backend}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matmul(benchmark, bandwidth, case):
    qtype, (rows, cols), n, threads, backend = case
    status = backend_status(backend, qtype, threads)
    if status != "ok":
        pytest.skip(status)
    if (qtype, rows, cols) not in _weights:
        _weights[qtype, rows, cols] = random_qtensor(qtype, rows, cols)
    qt = _weights[qtype, rows, cols]
    x = np.random.default_rng(3).standard_normal((n, cols), dtype=np.float32)
    call, working_set = matmul_caller(qt, x, threads, backend)  # cold: cycles over copies of W
    with blas_threads(threads):
        call()  # warm-up: JIT compile, page faults
        benchmark(call)
    benchmark.extra_info.update(qtype=qtype, shape=[rows, cols], n=n, threads=threads, backend=backend,
                                nbytes=qt.nbytes, working_set_bytes=working_set)
    if benchmark.stats is not None:  # None under --benchmark-disable
        best = benchmark.stats.stats.min
        gbs = qt.nbytes / best / 1e9
        benchmark.extra_info.update(weight_GB_s=round(gbs, 3), G_weights_s=round(rows * cols / best / 1e9, 3),
                                    bandwidth_GB_s=round(bandwidth[threads] / 1e9, 2),
                                    bandwidth_fraction=round(gbs * 1e9 / bandwidth[threads], 4))


@pytest.fixture(scope="module", params=[1, 2], ids=lambda t: f"t{t}")
def demo_engine(request, demo_model):
    from weightstream.engine.runtime.engine import Engine

    threads = request.param
    with blas_threads(threads), Engine.load(demo_model, threads=threads) as engine:
        yield engine, threads


def test_decode_pp64(benchmark, demo_engine):
    engine, threads = demo_engine
    ids = np.random.default_rng(0).integers(0, engine.config.n_vocab, 64)
    with blas_threads(threads):
        benchmark.pedantic(engine.model.forward, (ids, 0), rounds=5, warmup_rounds=1)
    _tok_s(benchmark, 64, threads)


def test_decode_tg32(benchmark, demo_engine):
    engine, threads = demo_engine
    ids = np.random.default_rng(0).integers(0, engine.config.n_vocab, 32)

    def tg32():
        for pos, token in enumerate(ids):
            engine.model.forward(token[None], pos)

    with blas_threads(threads):
        benchmark.pedantic(tg32, rounds=3, warmup_rounds=1)
    _tok_s(benchmark, 32, threads)


def _tok_s(benchmark, tokens: int, threads: int) -> None:
    benchmark.extra_info.update(threads=threads, tokens=tokens)
    if benchmark.stats is not None:
        benchmark.extra_info["tok_s"] = round(tokens / benchmark.stats.stats.min, 2)
