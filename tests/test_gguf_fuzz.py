"""The GGUF fuzz suite, bounded for CI (issue 16: "Proof"): 400 derandomized hypothesis cases over
the structure and metadata of tiny models (tests/gguf_fuzz.py), each loaded through Engine.load in
a worker subprocess under a timeout. Fails on any crash, hang, raw error or memory blow-up (on
any file), or a structurally invalid file that loads. The long run is bench/fuzz_gguf.py (docs/FUZZ.md)."""
import time
from collections import Counter

import pytest

from tests import gguf_fuzz
from tests.gguf_fuzz import Case, Runner, counts, failures, fuzz, structure_problem, value_findings, write_bases
from tests.tiny_gguf import patched_gguf
from weightstream.engine.errors import GGUFError
from weightstream.engine.formats.gguf_header import read_layout

CI_CASES = 400


def test_the_fuzzed_gguf_files_never_crash_hang_blow_up_raise_raw_errors_or_load_silently(tmp_path):
    t0 = time.perf_counter()
    results = fuzz(CI_CASES, tmp_path)
    took = time.perf_counter() - t0
    c = counts(results)
    kinds = Counter(r.case.kind for r in results)
    print(f"\n{len(results)} cases in {took:.0f} s: {c}\nper kind: {dict(kinds)}")
    assert len(results) >= CI_CASES * 0.9 and len(kinds) >= 14, (len(results), kinds)  # the cases do vary
    assert c["clean"] > len(results) // 2 and c["loaded"] > 0, c
    # poisoned values (NaN rms_norm_eps, context_length 0, ...) on structurally valid files: the
    # config / weights / tokenizer validation refuses them with a clear error; some values are legal
    # (a huge context_length, rope base 1e30) and load: those are listed, not failed on
    findings = value_findings(results)
    for r in findings:
        print(f"value-level finding: {r.cls}: {r.case.describe()}: {r.msg}")
    broke = [r for r in findings if r.cls in gguf_fuzz.FAILING]
    assert not broke, "\n".join(f"{r.cls}: {r.case.describe()}: {r.msg}" for r in broke)
    unnamed = [r for r in results if r.cls == "clean" and r.case.expect == "invalid" and ".gguf" not in r.msg]
    assert not unnamed, [(r.case.describe(), r.msg) for r in unnamed[:5]]  # each error names the file
    bad = failures(results)
    assert not bad, "\n".join(f"{r.cls}: {r.case.describe()}: {r.msg}" for r in bad)


# ---- the fuzzer's own parts: they must be able to fail -------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return write_bases(tmp_path_factory.mktemp("bases"))


def test_the_oracle_refuses_what_the_reader_refuses(tmp_path, bases):
    """The independent oracle (gguf's reader + llama.cpp's table rules) agrees with read_layout on
    each kind of crafted structural defect, so a reader that let one through would show up as
    'silent' in the fuzz run."""
    lay = read_layout(bases["llama"])
    assert structure_problem(bases["llama"]) is None
    t = lay.tensors[3]
    type_at = t.dims_offset + 4 + 8 * len(t.shape)
    crafted = {"misaligned": [(type_at + 4, "Q", t.offset - lay.data_offset + 4)],
               "wrap": [(type_at + 4, "Q", 2**64 - lay.data_offset)],
               "type": [(type_at, "I", 1)], "dim0": [(t.dims_offset + 4, "q", 0)],
               "n_dims": [(t.dims_offset, "I", 5)], "utf8": [(lay.kv[1].offset + 9, b"\xff")]}
    for name, edits in crafted.items():
        path = patched_gguf(bases["llama"], tmp_path / f"{name}.gguf", edits)
        with pytest.raises(GGUFError):
            read_layout(path)
        assert structure_problem(path) is not None, name


def test_the_runner_classifies_a_silent_load_a_hang_and_a_crash(tmp_path, bases):
    runner = Runner(tmp_path, bases["llama"])
    try:
        ok = runner.run(Case("llama", "none", "unchanged"), bases["llama"])
        assert ok.cls == "loaded" and not ok.structural, ok
        lied = runner.run(Case("llama", "none", "said invalid", expect="invalid"), bases["llama"])
        assert lied.cls == "silent" and lied.structural, lied  # a file known invalid that loads fails the suite
        runner.timeout_s = 0.0
        hang = runner.run(Case("llama", "none", "no time"), bases["llama"])
        assert hang.cls == "hang" and runner.proc is None, hang  # the worker is killed and restarted next time
        runner.timeout_s = 20.0
        runner._start()
        runner.proc.kill()
        dead = runner.run(Case("llama", "none", "worker gone"), bases["llama"])
        assert dead.cls == "crash", dead
        assert [r.cls for r in gguf_fuzz.failures([ok, lied, hang, dead])] == ["silent"]
    finally:
        runner.close()
