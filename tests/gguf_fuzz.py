"""The GGUF fuzzer shared by tests/test_gguf_fuzz.py (a bounded CI run) and bench/fuzz_gguf.py (a
long run): mutated tiny models, each loaded through the real path (Engine.load, the MoE with its
experts streamed, then one generated token) in a long-lived worker subprocess, classified as
issue 16's review did.

Cases (hypothesis strategies, seeded by the caller): truncation and byte flips in every region
(header, key/values, tensor infos, padding, data); crafted counts, lengths, value types, n_dims,
dims, tensor types, tensor offsets, alignments; non-UTF-8 bytes in keys and strings; poisoned
metadata values (NaN/inf/0/huge floats and integers).

Classes: clean (a WeightstreamError or FileNotFoundError with a message), raw (any other
exception), memory (RSS growth over the bound), crash (the worker died), hang (no answer within
the timeout), silent (a structurally invalid file loaded), loaded (a structurally valid file
loaded). Whether a file that loaded (or raised a raw error) is structurally valid is decided by
an oracle independent of our reader: gguf's own GGUFReader plus llama.cpp's tensor-table rules
(`structure_problem`). Findings on structurally valid files (poisoned values, a flipped key name,
NaN weights) belong to the config/weights validation, not the file reader: `value_findings`.

Run as `python -m tests.gguf_fuzz worker` it is the worker: one JSON case per line on stdin, one
JSON answer per line on the original stdout (the engine's own prints go to stderr).
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.tiny_gguf import (patched_gguf, tiny_llama_metadata, tiny_llama_tensors, tiny_moe_metadata,
                             tiny_moe_tensors, write_gguf)

U64 = 2**64
FAILING = ("raw", "memory", "crash", "hang", "silent")  # classes the suite must not see
REGIONS = ("header", "kv", "tensor_infos", "padding", "data")


# ---- base files --------------------------------------------------------------------------------
def write_bases(directory: Path) -> dict[str, Path]:
    """Tiny valid models: dense llama, a Mixtral-layout MoE, and a dense one aligned to 64 (so
    general.alignment exists to be mutated). One merge, so the gpt2 tokenizer loads."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, tensors, meta, align in (("llama", tiny_llama_tensors(), tiny_llama_metadata(), None),
                                       ("moe", tiny_moe_tensors(), tiny_moe_metadata(), None),
                                       ("align64", tiny_llama_tensors(1), tiny_llama_metadata(), 64)):
        meta["tokenizer.ggml.merges"] = ["<t1> <t2>"]
        meta["general.dup_a"], meta["general.dup_b"] = "a", "b"  # one renamed to the other: a duplicate key
        out[name] = write_gguf(directory / f"{name}.gguf", tensors, meta, alignment=align)
    return out


def regions(lay) -> dict[str, tuple[int, int]]:
    """[start, end) of each region of a valid file's layout (padding may be empty)."""
    return {"header": (0, 24), "kv": (24, lay.tensor_infos_offset),
            "tensor_infos": (lay.tensor_infos_offset, lay.tensor_infos_end),
            "padding": (lay.tensor_infos_end, lay.data_offset), "data": (lay.data_offset, lay.data_end)}


# ---- cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    base: str
    kind: str
    detail: str
    edits: list = field(default_factory=list)  # patched_gguf edits
    cut: int | None = None
    expect: str = "unknown"  # "invalid": structurally invalid for sure; "value": only values poisoned

    def describe(self) -> str:
        return f"{self.base}:{self.kind}:{self.detail}"


def case_strategy(layouts: dict):
    """A hypothesis strategy of Case over the base files' layouts ({base name: Layout})."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        base = draw(st.sampled_from(sorted(layouts)))
        lay = layouts[base]
        kind = draw(st.sampled_from(["truncate", "flip", "flip", "flip", "header_count", "length", "value_type",
                                     "n_dims", "dim", "tensor_type", "tensor_offset", "utf8", "poison",
                                     "alignment", "duplicate", "swap_offsets"]))
        return _MAKERS[kind](draw, st, base, lay)

    return cases()


def _region(draw, st, lay):
    spans = {k: v for k, v in regions(lay).items() if v[1] > v[0]}
    name = draw(st.sampled_from(sorted(spans)))
    return name, spans[name]


def _truncate(draw, st, base, lay):
    name, (a, b) = _region(draw, st, lay)
    cut = draw(st.integers(a, b - 1))
    return Case(base, "truncate", f"{name}@{cut}", cut=cut, expect="invalid")


def _flip(draw, st, base, lay):
    name, (a, b) = _region(draw, st, lay)
    n = draw(st.integers(1, 3))
    edits = []
    data = lay.path.read_bytes()
    for _ in range(n):
        at, x = draw(st.integers(a, b - 1)), draw(st.integers(1, 255))
        edits.append((at, bytes([data[at] ^ x])))
    return Case(base, "flip", f"{name}@" + ",".join(f"{e[0]}^{e[1].hex()}" for e in edits), edits)


def _header_count(draw, st, base, lay):
    at, which = draw(st.sampled_from([(8, "n_tensors"), (16, "n_kv")]))
    current = len(lay.tensors) if which == "n_tensors" else len(lay.kv)
    v = draw(st.sampled_from([current + 1, current - 1, 0, 2**32, 2**40, 2**63, U64 - 1]))
    if v == 0 and current == 0:
        v = 1
    return Case(base, "header_count", f"{which}={v}", [(at, "Q", v % U64)], expect="invalid" if v > 2**31 else "unknown")


def _length(draw, st, base, lay):
    kv = draw(st.sampled_from([f for f in lay.kv if f.vtype in (8, 9)]))
    at = kv.value_offset + (4 if kv.vtype == 9 else 0)  # an array's count follows its item type
    current = kv.count if kv.vtype == 9 else int.from_bytes(lay.path.read_bytes()[at:at + 8], "little")
    v = draw(st.sampled_from([current + 1, current - 1, 2**31, 2**40, 2**63, U64 - 1]))
    huge = v >= 2**31
    return Case(base, "length", f"{kv.key}={v}", [(at, "Q", v % U64)], expect="invalid" if huge else "unknown")


def _value_type(draw, st, base, lay):
    kv = draw(st.sampled_from(lay.kv))
    v = draw(st.one_of(st.integers(13, 2**32 - 1), st.integers(0, 12)))
    return Case(base, "value_type", f"{kv.key}:type={v}", [(kv.value_offset - 4, "I", v)],
                expect="invalid" if v > 12 else "unknown")


def _tensor(draw, st, lay):
    return draw(st.sampled_from(lay.tensors))


def _n_dims(draw, st, base, lay):
    t = _tensor(draw, st, lay)
    v = draw(st.sampled_from([0, 5, 2**32 - 1, len(t.shape) + 1, max(1, len(t.shape) - 1)]))
    return Case(base, "n_dims", f"{t.name}:n_dims={v}", [(t.dims_offset, "I", v)],
                expect="invalid" if v == 0 or v > 4 else "unknown")


def _dim(draw, st, base, lay):
    t = _tensor(draw, st, lay)
    j = draw(st.integers(0, len(t.shape) - 1))
    v = draw(st.sampled_from([0, -1, -(2**63), 2**40, 2**62, 2**63 - 1]))
    return Case(base, "dim", f"{t.name}:ne[{j}]={v}", [(t.dims_offset + 4 + 8 * j, "q", v)], expect="invalid")


def _tensor_type(draw, st, base, lay):
    t = _tensor(draw, st, lay)
    v = draw(st.one_of(st.sampled_from([4, 5, 42, 99, 2**31, 2**32 - 1]), st.integers(0, 40)))
    return Case(base, "tensor_type", f"{t.name}:type={v}", [(t.dims_offset + 4 + 8 * len(t.shape), "I", v)],
                expect="invalid" if v in (4, 5) or v > 40 else "unknown")


def _tensor_offset(draw, st, base, lay):
    t = _tensor(draw, st, lay)
    rel = t.offset - lay.data_offset
    v = draw(st.sampled_from([rel + 1, rel + lay.alignment, rel - lay.alignment, 0, -lay.data_offset,
                              -lay.data_offset + 32, U64 - 1, 2**63, rel + 2**32]))
    if v % U64 == rel:
        v = rel + 1
    return Case(base, "tensor_offset", f"{t.name}:offset={v % U64}",
                [(t.dims_offset + 4 + 8 * len(t.shape) + 4, "Q", v % U64)], expect="invalid")


def _utf8(draw, st, base, lay):
    kv = draw(st.sampled_from([f for f in lay.kv if f.vtype == 8 or f.item_type == 8] or lay.kv))
    in_key = draw(st.booleans()) or not (kv.vtype == 8 or kv.item_type == 8)
    key_len = len(kv.key.encode())
    if in_key:
        at = kv.offset + 8 + draw(st.integers(0, key_len - 1))
    else:  # the first byte of the (first) string value
        first = kv.value_offset + (12 if kv.vtype == 9 else 0)
        data = lay.path.read_bytes()
        n = int.from_bytes(data[first:first + 8], "little")
        if n == 0:
            return Case(base, "utf8", f"{kv.key}:key", [(kv.offset + 8, b"\xff")], expect="invalid")
        at = first + 8 + draw(st.integers(0, n - 1))
    return Case(base, "utf8", f"{kv.key}:{'key' if in_key else 'value'}@{at}", [(at, b"\xff")], expect="invalid")


def _poison(draw, st, base, lay):
    scalars = [f for f in lay.kv if f.vtype in (4, 5, 6, 10, 11, 12)]
    kv = draw(st.sampled_from(scalars))
    if kv.vtype in (6, 12):
        v = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e30]))
        fmt = "f" if kv.vtype == 6 else "d"
    else:
        fmt = {4: "I", 5: "i", 10: "Q", 11: "q"}[kv.vtype]
        v = draw(st.sampled_from([0, 1, 2**31 - 1] + ([-1] if fmt in "iq" else [2**32 - 1])))
    return Case(base, "poison", f"{kv.key}={v}", [(kv.value_offset, fmt, v)], expect="value")


def _alignment(draw, st, base, lay):
    kv = next((f for f in lay.kv if f.key == "general.alignment"), None)
    if kv is None:
        return _tensor_offset(draw, st, base, lay)
    v = draw(st.sampled_from([0, 3, 48, 2**31, 2**32 - 1, 16, 128]))
    return Case(base, "alignment", f"alignment={v}", [(kv.value_offset, "I", v)],
                expect="invalid" if v & (v - 1) or v == 0 or v > 4096 else "unknown")


def _duplicate(draw, st, base, lay):
    """A duplicate key (general.dup_b renamed general.dup_a) or tensor name (blk.1.X -> blk.0.X)."""
    if draw(st.booleans()):
        b = next(f for f in lay.kv if f.key == "general.dup_b")
        return Case(base, "duplicate", "key general.dup_a", [(b.offset + 8 + len("general.dup_"), b"a")],
                    expect="invalid")
    t = draw(st.sampled_from([t for t in lay.tensors if t.name.startswith("blk.1.")]))
    return Case(base, "duplicate", f"tensor {t.name}", [(t.info_offset + 8 + 4, b"0")], expect="invalid")


def _swap_offsets(draw, st, base, lay):
    i, j = sorted(draw(st.lists(st.integers(0, len(lay.tensors) - 1), min_size=2, max_size=2, unique=True)))
    a, b = lay.tensors[i], lay.tensors[j]
    at = [t.dims_offset + 4 + 8 * len(t.shape) + 4 for t in (a, b)]
    rel = [t.offset - lay.data_offset for t in (a, b)]
    return Case(base, "swap_offsets", f"{a.name}<->{b.name}", [(at[0], "Q", rel[1]), (at[1], "Q", rel[0])],
                expect="invalid")


_MAKERS = {"duplicate": _duplicate, "swap_offsets": _swap_offsets, "truncate": _truncate, "flip": _flip, "header_count": _header_count, "length": _length,
           "value_type": _value_type, "n_dims": _n_dims, "dim": _dim, "tensor_type": _tensor_type,
           "tensor_offset": _tensor_offset, "utf8": _utf8, "poison": _poison, "alignment": _alignment}


# ---- the oracle: is a file structurally valid? (gguf's reader + llama.cpp's table rules) -------
def structure_problem(path: Path) -> str | None:
    """None for a structurally valid GGUF, else what is wrong; independent of engine/formats."""
    import gguf

    size = os.path.getsize(path)
    try:
        r = gguf.GGUFReader(path)
        for f in r.fields.values():
            f.contents()  # decodes every string
        names = [t.name for t in r.tensors]
    except Exception as e:  # noqa: BLE001 - any failure of the reference parser means invalid
        return f"gguf's reader: {type(e).__name__}: {str(e)[:200]}"
    af = r.fields.get("general.alignment")
    align = 32 if af is None else int(af.contents())
    if af is not None and af.types[0] != gguf.GGUFValueType.UINT32 or align <= 0 or align & (align - 1):
        return f"alignment {align}"
    if len(set(names)) != len(names):
        return "duplicate tensor names"
    expected = 0
    for t in r.tensors:
        ne = [int(n) for n in t.field.parts[3]]  # dims in GGUF order
        rel = int(t.field.parts[-1][0])
        if not 1 <= len(ne) <= 4 or min(ne) <= 0 or np.prod(ne, dtype=object) >= 2**63:
            return f"{t.name}: dims {ne}"
        if len(t.name.encode()) >= 64:
            return f"{t.name}: name too long"
        blk, nb = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if ne[0] % blk:
            return f"{t.name}: row not a multiple of the block"
        if rel != expected:
            return f"{t.name}: offset {rel}, expected {expected}"
        nbytes = int(np.prod(ne, dtype=object)) // blk * nb
        if r.data_offset + rel + nbytes > size:
            return f"{t.name}: past the end"
        expected = (expected + nbytes + align - 1) // align * align
    return None


# ---- the worker (child side) -------------------------------------------------------------------
def _load_once(path: str, options: dict | None = None) -> tuple[str, str]:
    from weightstream.engine import Engine
    from weightstream.engine.errors import WeightstreamError

    try:
        with Engine.load(path, **(options or {})) as e:
            e.generate([1, 2], max_new_tokens=1)
        return "loaded", ""
    except (WeightstreamError, FileNotFoundError) as ex:
        msg = str(ex)
        return ("clean", msg[:300]) if msg.strip() else ("raw", f"{type(ex).__name__} with no message")
    except Exception as ex:  # noqa: BLE001 - what the fuzzer is looking for
        import traceback

        where = traceback.extract_tb(ex.__traceback__)[-1]
        return "raw", f"{type(ex).__name__}: {str(ex)[:200]} ({Path(where.filename).name}:{where.lineno})"


def worker_main() -> None:
    import resource

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engine's prints must not reach the answer pipe
    warm = os.environ.get("GGUF_FUZZ_WARMUP")
    if warm:
        _load_once(warm)  # imports, JIT and first-touch costs before the first timed case
    out.write(json.dumps({"ready": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        outcome, msg = _load_once(case["path"], case.get("options"))
        problem = structure_problem(Path(case["path"])) if outcome in ("loaded", "raw") else None
        out.write(json.dumps({"outcome": outcome, "msg": msg, "problem": problem,
                              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")


# ---- the runner (parent side) ------------------------------------------------------------------
@dataclass
class Result:
    case: Case
    cls: str  # clean / raw / memory / crash / hang / silent / loaded
    msg: str
    structural: bool  # counts against the reader (False: a value-level finding)


class Runner:
    """Feeds cases to one long-lived worker, restarting it after a crash, hang or blow-up."""

    def __init__(self, workdir: Path, warmup: Path, timeout_s: float = 20.0, rss_limit_mib: int = 512):
        self.workdir, self.warmup, self.timeout_s = workdir, warmup, timeout_s
        self.rss_limit_kib = rss_limit_mib * 1024
        self.proc = None
        self.n = 0

    def _start(self) -> None:
        env = dict(os.environ, GGUF_FUZZ_WARMUP=str(self.warmup), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.gguf_fuzz", "worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        ready = self._answer(180.0)
        if not isinstance(ready, dict) or "ready" not in ready:
            raise RuntimeError(f"fuzz worker did not start: {ready}")
        self.base_rss_kib = ready["ready"]

    def _answer(self, timeout_s: float):
        """The worker's next JSON line, or 'hang' / 'memory' / ('crash', returncode)."""
        import psutil

        deadline = time.monotonic() + timeout_s
        ps = psutil.Process(self.proc.pid)
        while True:
            if time.monotonic() > deadline:
                return "hang"
            r, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    return ("crash", self.proc.wait())
                return json.loads(line)
            try:
                if ps.memory_info().rss > self.rss_limit_kib * 1024 + 512 * 2**20:
                    return "memory"  # while it runs: growth far past the bound, kill before the machine swaps
            except psutil.NoSuchProcess:
                return ("crash", self.proc.wait())

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case: Case, base_path: Path) -> Result:
        if self.proc is None:
            self._start()
        self.n += 1
        path = self.workdir / f"case{self.n}.gguf"
        patched_gguf(base_path, path, case.edits, cut=case.cut)
        try:
            # the MoE streams its experts: their byte ranges are read with pread, not the map
            options = {"stream": "experts"} if case.base == "moe" else {}
            self.proc.stdin.write(json.dumps({"path": str(path), "options": options}) + "\n")
            self.proc.stdin.flush()
            ans = self._answer(self.timeout_s)
        except BrokenPipeError:
            ans = ("crash", self.proc.wait())
        if isinstance(ans, dict) and ans["maxrss_kib"] - self.base_rss_kib > self.rss_limit_kib:
            ans = "memory"  # the peak grew past the bound, even though the case ended
        try:
            return self._classify(case, path, ans)
        finally:
            path.unlink(missing_ok=True)

    def _classify(self, case: Case, path: Path, ans) -> Result:
        if not isinstance(ans, dict):  # crash, hang or blow-up: the worker goes; ask the oracle apart
            self._kill()
            cls = ans[0] if isinstance(ans, tuple) else ans
            msg = f"exit {ans[1]}" if isinstance(ans, tuple) else ""
            return Result(case, cls, msg, case.expect != "value" and _problem_apart(path) is not None)
        outcome, problem = ans["outcome"], ans["problem"]
        invalid = case.expect == "invalid" or problem is not None
        if outcome == "loaded":
            return Result(case, "silent" if invalid else "loaded", problem or "", invalid)
        if outcome == "raw":
            return Result(case, "raw", ans["msg"], invalid and case.expect != "value")
        return Result(case, "clean", ans["msg"], True)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
            self.proc = None


def _problem_apart(path: Path) -> str | None:
    """The oracle in a fresh process (the worker died on this file; so might the oracle)."""
    code = "import sys; from tests.gguf_fuzz import structure_problem as p; print(p(sys.argv[1]) or '')"
    try:
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return "the oracle timed out"
    return out.stdout.strip() or (None if out.returncode == 0 else f"the oracle failed: exit {out.returncode}")


# ---- a whole run -------------------------------------------------------------------------------
def fuzz(n_cases: int, workdir: Path, progress=None) -> list[Result]:
    """n_cases cases drawn by hypothesis, derandomized: the same cases, in the same order, every run
    (hypothesis seeds a derandomized run from the test function itself)."""
    from hypothesis import HealthCheck, Phase, given, settings

    from weightstream.engine.formats.gguf_header import read_layout

    bases = write_bases(workdir / "bases")
    layouts = {k: read_layout(p) for k, p in bases.items()}
    runner = Runner(workdir, bases["llama"])
    results: list[Result] = []

    @settings(max_examples=n_cases, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case_strategy(layouts))
    def one(case: Case) -> None:
        results.append(runner.run(case, bases[case.base]))
        if progress is not None:
            progress(results)

    try:
        one()
    finally:
        runner.close()
    return results


def counts(results: list[Result]) -> dict[str, int]:
    out = {c: 0 for c in ("clean", "loaded", *FAILING)}
    for r in results:
        out[r.cls] += 1
    return out


def failures(results: list[Result]) -> list[Result]:
    """What counts against the reader: a failing class on a structurally invalid file."""
    return [r for r in results if r.cls in FAILING and r.structural]


def value_findings(results: list[Result]) -> list[Result]:
    """Failing classes on files whose structure is valid, and poisoned values that loaded: the
    config/weights/tokenizer validation's to refuse, not the reader's."""
    return [r for r in results if (r.cls in FAILING and not r.structural) or
            (r.cls == "loaded" and (r.case.expect == "value" or _flipped_metadata(r.case)))]


def _flipped_metadata(case: Case) -> bool:
    """A byte flip outside the data that left a valid structure: a changed key, value or tensor
    name (e.g. output.weight renamed) that loaded: the tensor-set/config checks' to refuse."""
    return case.kind == "flip" and not case.detail.startswith("data@")


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    worker_main()
