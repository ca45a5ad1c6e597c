"""The benchmark functions run on tiny shapes and return sane, self-consistent figures. No timing
asserts (DESIGN.md, habit 8): speed is measured in bench/, not judged here."""
import argparse
import json
import math

import numpy as np
import pytest

from weightstream.kernels import bench, formats
from tests.tiny_gguf import tiny_llama_metadata, tiny_llama_tensors, write_gguf

FAST = dict(repeats=1, min_time=0.0)


def test_memory_bandwidth_is_positive():
    for threads in (1, 2):
        bw = bench.memory_bandwidth(threads, size_bytes=1 << 22, repeats=2)
        assert math.isfinite(bw) and bw > 0
    with pytest.raises(ValueError):
        bench.memory_bandwidth(0)


def test_bench_matmul_figures_agree():
    rows, cols, n = 64, 256, 3
    r = bench.bench_matmul("Q4_0", rows, cols, n, 1, "numpy", bandwidth=1e10, **FAST)
    assert r["status"] == "ok" and r["qtype"] == "Q4_0" and r["shape"] == [rows, cols]
    assert r["nbytes"] == rows * formats.row_bytes(formats.T.Q4_0, cols)
    assert r["cold"] and r["working_set_bytes"] % r["nbytes"] == 0 and r["working_set_bytes"] > r["nbytes"]
    s = r["seconds"]
    assert s > 0 and r["calls"] >= 1
    assert r["weights_per_s"] * s == pytest.approx(rows * cols)
    assert r["weight_bytes_per_s"] * s == pytest.approx(r["nbytes"])
    assert r["gflops"] * 1e9 * s == pytest.approx(2 * n * rows * cols)
    assert r["bandwidth_fraction"] == pytest.approx(r["weight_bytes_per_s"] / 1e10)


@pytest.mark.parametrize("backend", ["cython", "numba", "numpy", "auto"])
def test_every_backend_runs_or_says_na(backend):
    r = bench.bench_matmul("Q2_K", 16, 256, 1, 1, backend, **FAST)
    assert r["status"] == "ok" or r["status"].startswith("n/a")
    assert (r["seconds"] is not None) == (r["status"] == "ok")


def test_suite_table_and_json(tmp_path):
    res = bench.run_suite(["Q4_1"], [(32, 256)], [1, 2], [1, 2], ["numpy", "auto", "nonesuch"],
                          bandwidth_bytes=1 << 22, **FAST)
    assert set(res["bandwidth"]) == {"1", "2"} and res["machine"]["cores"] >= 1
    rows = res["results"]
    assert len(rows) == 2 * 2 * 3
    assert all(r["status"].startswith("n/a") for r in rows if r["backend"] == "nonesuch")
    assert all(r["status"] == "ok" and r["bandwidth_fraction"] > 0 for r in rows if r["backend"] == "numpy")
    table = bench.format_table(res)
    assert table.count("\n| Q4_1 |") == len(rows) and "% of bandwidth" in table
    assert bench.best_backends(res) == {"Q4_1": {"1": "numpy", "2": "numpy"}}  # the only one that ran
    path = bench.save_results(res, tmp_path / "sub" / "k.json")
    assert json.loads(path.read_text())["results"][0]["qtype"] == "Q4_1"


def test_best_backend_weighs_every_shape_alike():
    """The choice is the least geometric mean time over the shapes, not the least sum: a backend
    4% faster on one big matrix and 1.6x slower on a small one loses; Cython stays unless the
    best is more than 15% faster in that mean."""
    def row(backend, shape, secs):
        return {"qtype": "Q4_0", "n": 1, "threads": 2, "backend": backend, "shape": shape, "seconds": secs}
    res = {"results": [row("numba", [14336, 4096], 2.00e-3), row("cython", [14336, 4096], 2.08e-3),
                       row("numba", [768, 2048], 84e-6), row("cython", [768, 2048], 53e-6),
                       row("numpy", [14336, 4096], 80e-3), row("numpy", [768, 2048], None),
                       row("cython", [768, 2048], 1.0) | {"threads": 1}]}
    assert bench.best_backends(res) == {"Q4_0": {"1": "cython"}}
    res["results"][3]["seconds"] = 95e-6  # numba now 1.08x faster in the mean: not enough
    assert bench.best_backends(res) == {"Q4_0": {"1": "cython"}}
    res["results"][3]["seconds"] = 120e-6  # 1.22x: numba
    assert bench.best_backends(res) == {"Q4_0": {"1": "numba"}}


def test_bench_decode_on_a_tiny_model(tmp_path):
    from weightstream.engine.tools.bench_decode import bench_decode, format_decode

    meta = tiny_llama_metadata()
    meta["tokenizer.ggml.tokens"][2] = "<t0><t1>"  # one merge: a BPE vocabulary needs at least one
    meta["tokenizer.ggml.merges"] = ["<t0> <t1>"]
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama_tensors(), meta)
    r = bench_decode(path, prompt_tokens=5, gen_tokens=3, threads=1, repeats=2)
    # llama-bench's figures: the mean and sample sd of the runs' tokens/s, and the best run's
    rates = [3 / s for s in r["tg_runs"]]
    assert r["tg_tok_s"] == pytest.approx(np.mean(rates)) and r["tg_tok_s_sd"] == pytest.approx(np.std(rates, ddof=1))
    assert r["pp_tok_s_best"] == pytest.approx(5 / min(r["pp_runs"]))
    assert len(r["tg_runs"]) == 2 and r["load_s"] > 0
    text = format_decode([r, r])
    assert text.count("| pp5 |") == 2 and text.count("| tg3 |") == 2 and "±" in text


def test_cli_parses_and_runs_bandwidth(capsys):
    from weightstream.engine.cli import bench as bench_cli

    ap = argparse.ArgumentParser()
    bench_cli.register(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["bench", "kernels", "--types", "Q2_K,Q4_K", "--threads", "1,2", "--n", "1,512",
                       "--shapes", "14336x4096,768x2048", "--quick", "--json", "out.json"])
    assert a.types == ("Q2_K", "Q4_K") and a.threads == (1, 2) and a.n == (1, 512)
    assert a.shapes == ((14336, 4096), (768, 2048)) and a.quick and a.json == "out.json"
    a = ap.parse_args(["bench", "decode", "m.gguf", "-p", "16", "-n", "8", "-t", "1,2"])
    assert (a.model, a.n_prompt, a.n_gen, a.threads) == ("m.gguf", 16, 8, (1, 2))
    a = ap.parse_args(["bench", "bandwidth", "--size-mib", "4", "--repeats", "1"])
    assert a.func(a) == 0 and "GB/s" in capsys.readouterr().out
