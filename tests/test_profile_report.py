"""The profiler's outputs (engine/observe/report.py) from a real streamed run: the Chrome trace has a
track per thread and an event per pass and read, the plots are PNGs, every file is written through
a temporary name, and the plots say what to install when matplotlib is missing."""
import json
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine import Engine  # noqa: E402
from weightstream.engine.observe.report import (chrome_trace, format_summary, plot_hit_rate_per_layer,  # noqa: E402
                                   plot_hit_rate_vs_cache, plot_token_timeline, write_report)
from tests.hf_models import moe_gguf_file, smollm2_gguf_path  # noqa: E402

if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """(Profiler, summary) of 8 generated tokens, experts streamed through a 4-slot cache."""
    path = moe_gguf_file("qwen3moe", tmp_path_factory.mktemp("qwen3moe"))
    with Engine.load(path, n_ctx=64, stream="experts", cache_slots=4, prefetch="lookahead", profile=True) as eng:
        list(eng.generate_tokens(list(range(100, 108)), 8))
        return eng.profiler, eng.profile_summary(disk_gbps=1.0)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_chrome_trace(profiled, tmp_path):
    prof, _ = profiled
    assert prof.reads, "the run must read experts for the test to mean anything"
    trace = json.loads(chrome_trace(prof, tmp_path / "t.json").read_text())
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    names = {(e["tid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert (0, "compute") in names
    assert {(j.thread + 1, f"reader {j.thread}") for j in prof.reads} <= names
    assert any(e["ph"] == "M" and e["name"] == "process_name" and e["args"]["name"] == "weightstream" for e in events)
    spans = [e for e in events if e["ph"] == "X"]
    reads = [e for e in spans if e["cat"] in ("demand", "prefetch")]
    assert len(reads) == len(prof.reads)
    assert all(e["name"].startswith("read ") and e["tid"] >= 1 and "queued_ms" in e["args"] for e in reads)
    assert sum(e["cat"] == "forward" for e in spans) == len(prof.forwards)
    assert sum(e["cat"] == "layer" for e in spans) == len(prof.layers)
    assert sum(e["cat"] == "stall" for e in spans) == len(prof.stalls)
    assert all(e["ts"] >= 0 and e["dur"] >= 0 and e["pid"] == 1 for e in spans)


def test_plots(profiled, tmp_path):
    prof, s = profiled
    assert_png(plot_token_timeline(prof, tmp_path / "timeline.png"))
    assert_png(plot_token_timeline(prof, tmp_path / "prefill.png", forward=0))  # the prompt pass
    assert_png(plot_hit_rate_per_layer(s, tmp_path / "layers.png"))
    assert_png(plot_hit_rate_vs_cache(s, tmp_path / "cache.png"))
    with pytest.raises(ValueError, match="no forward pass 999"):
        plot_token_timeline(prof, tmp_path / "x.png", forward=999)


def test_write_report(profiled, tmp_path):
    prof, s = profiled
    written = write_report(prof, s, tmp_path / "out.png", tmp_path / "trace.json", tmp_path / "out.json")
    names = ["out.json", "trace.json", "out.png", "out.hit_layers.png", "out.hit_cache.png"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary file left behind
    for p in written[2:]:
        assert_png(p)
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["hit_rate"] == s["hit_rate"] and set(loaded["hit_rate_per_layer"]) == {str(k) for k in
                                                                                         s["hit_rate_per_layer"]}
    assert_png(plot_hit_rate_per_layer(loaded, tmp_path / "from_json.png"))  # string layer keys are fine
    assert write_report(prof, s) == []


def test_writes_go_through_a_temporary_name(profiled, tmp_path, monkeypatch):
    prof, s = profiled
    import weightstream.engine.formats.atomic as atomic  # the report's writes go through engine/formats/atomic.py

    moves = []
    real_replace = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moves.append((a, b)), real_replace(a, b)))
    written = write_report(prof, s, tmp_path / "out.png", tmp_path / "trace.json", tmp_path / "out.json")
    assert [str(b) for _, b in moves] == [str(p) for p in written]
    assert all(str(a) != str(b) and str(a).startswith(str(tmp_path)) for a, b in moves)


def test_failed_write_leaves_nothing(profiled, tmp_path):
    prof, s = profiled
    with pytest.raises(TypeError):
        write_report(prof, {"bad": object()}, json_path=tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_format_summary(profiled):
    _, s = profiled
    text = format_summary(s)
    assert f"hit rate {s['hit_rate']:.1%}" in text and "Belady's offline optimum" in text and "disk 1.00 GB/s" in text
    assert f"{s['reuse_rate']:.1%} reused" in text and "{" not in text  # named figures, no raw dict
    assert text.startswith(f"{s['decode_passes']} decode passes at ")
    assert f"{s['expert_reads']} expert reads ({s['preads']} preads)" in text
    bare = {k: v for k, v in s.items() if k not in ("disk_gbps", "read_vs_disk", "belady_hit_rate", "cache_slots")}
    bare["prefetch"] = dict(s["prefetch"], issued=0)
    text = format_summary(bare)
    assert "hit rate" in text and "Belady" not in text and "disk" not in text and "no prefetch issued" in text
    assert format_summary({}).startswith("0 decode passes at 0.00 tok/s")


def test_format_summary_says_why_no_prefetch_under_routing(profiled):
    _, s = profiled
    text = format_summary(dict(s, prefetch=dict(s["prefetch"], issued=0), prefetch_mode="routing"))
    assert "no prefetch issued: --prefetch routing reads a layer's experts once its router has chosen them" in text


def test_format_summary_explains_reads_above_the_disk(profiled):
    _, s = profiled
    fast = dict(s, read_gbps_wall=3.0, disk_gbps=1.0, read_vs_disk=3.0, direct_io=False)
    assert "300%; above the disk: buffered reads were served in part by the page cache" in format_summary(fast)
    assert "with O_DIRECT, the disk measurement understates" in format_summary(dict(fast, direct_io=True))
    assert "above the disk" not in format_summary(dict(s, disk_gbps=10.0, read_vs_disk=0.5))


def test_plots_without_matplotlib(profiled, tmp_path, monkeypatch):
    prof, s = profiled
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for plot in (lambda: plot_token_timeline(prof, tmp_path / "a.png"),
                 lambda: plot_hit_rate_per_layer(s, tmp_path / "b.png"),
                 lambda: plot_hit_rate_vs_cache(s, tmp_path / "c.png"),
                 lambda: write_report(prof, s, plot_path=tmp_path / "d.png")):
        with pytest.raises(RuntimeError, match=r"plots need matplotlib: pip install -e '\.\[plot\]'"):
            plot()
    assert list(tmp_path.iterdir()) == []
    write_report(prof, s, json_path=tmp_path / "s.json", trace_path=tmp_path / "t.json")  # no plot: no need
