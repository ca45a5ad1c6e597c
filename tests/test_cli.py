"""The weightstream command, run as a user would (python -m weightstream), on the demo model."""
import subprocess
import sys



def cli(*args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "weightstream", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_info(demo_model):
    rc, out, err = cli("info", demo_model)
    assert rc == 0, err
    assert "architecture  llama" in out and "134.5 M" in out and "Q4_1" in out and "Q8_0" in out


def test_run_prints_english(demo_model):
    rc, out, err = cli("run", demo_model, "-p", "The capital of France is", "-n", "8")
    assert rc == 0, err
    assert "Paris" in out
    assert "8 generated in 7 decode passes, " in err  # the first token comes from the prompt's pass


def test_perplexity_last_line(demo_model, tmp_path):
    from pydoc_data.topics import topics

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:6000])
    rc, out, err = cli("perplexity", demo_model, "-f", text, "-c", "128")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    ppl, err_ = last.removeprefix("PPL = ").split(" +/- ")  # llama-perplexity's "PPL = x +/- err"
    assert last.startswith("PPL = ") and 2 < float(ppl) < 100 and 0 < float(err_) < float(ppl)


def test_missing_model_is_a_clear_error(tmp_path):
    rc, out, err = cli("run", tmp_path / "absent.gguf", "-p", "hi")
    assert rc == 1 and "GGUF file not found" in err and "Traceback" not in err


def test_help_lists_commands():
    rc, out, _ = cli("--help")
    assert rc == 0
    for command in ("run", "chat", "info", "perplexity", "convert", "demo"):
        assert command in out


def test_demo_streams_under_a_budget_smaller_than_the_model(demo_model):
    rc, out, err = cli("demo", "-n", "12")
    assert rc == 0, err[-2000:]
    assert out.startswith("> ") and len(out.split()) > 4
    assert "of a 92.00 MiB budget" in err and "stays on disk" in err  # the plan
    assert "hit rate" in err and "tok/s" in err  # the profiler's summary


def test_demo_moe_runs_a_synthetic_moe_3x_its_budget(tmp_path):
    rc, out, err = cli("demo", "--moe", "-n", "4", "--cache-dir", tmp_path)
    assert rc == 0, err[-2000:]
    model = tmp_path / "olmoe-1b-7b-synth-Q2_K.gguf"
    assert model.stat().st_size >= 3 * 640 * 2**20  # the file is at least 3x the default budget
    assert "of a 640.00 MiB budget" in err and "stays on disk" in err
    assert "hit rate" in err and "tok/s" in err
    assert out.startswith("> ")
    written = model.stat().st_mtime_ns
    rc, _, err = cli("demo", "--moe", "-n", "2", "--cache-dir", tmp_path)  # cached: not written again
    assert rc == 0, err[-2000:]
    assert model.stat().st_mtime_ns == written and "writing the synthetic MoE" not in err
