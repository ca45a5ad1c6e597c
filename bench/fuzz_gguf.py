"""The GGUF fuzzer of tests/test_gguf_fuzz.py for a longer run (issue 16: at least 2,000 cases).

    python bench/fuzz_gguf.py [N=2000] [--json out.json]

Same cases (derandomized hypothesis; the first 400 are the CI run's), same worker subprocess and
classes (tests/gguf_fuzz.py). Prints the count per class, then every case that counts against the
reader (a crash, hang, raw error, memory blow-up or silent load on a structurally invalid file)
and the value-level findings (structurally valid files: poisoned values, for the config/weights
validation). Exit status 1 if anything counts against the reader, or if any file (structurally
valid or not) gave a raw error, a memory blow-up, a crash or a hang.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.gguf_fuzz

from tests.gguf_fuzz import FAILING, counts, failures, fuzz, value_findings  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=2000, help="cases (default 2000)")
    ap.add_argument("--json", type=Path, help="write the counts and findings here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def progress(results):
        if len(results) % 250 == 0:
            print(f"  {len(results)} cases, {time.perf_counter() - t0:.0f} s: {counts(results)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="fuzz_gguf_") as d:
        results = fuzz(args.n, Path(d), progress=progress)
    took = time.perf_counter() - t0
    c = counts(results)
    bad, values = failures(results), value_findings(results)
    print(f"{len(results)} cases in {took:.0f} s")
    for cls, n in c.items():
        print(f"  {cls:8s} {n}")
    print(f"against the reader: {len(bad)}")
    for r in bad:
        print(f"  {r.cls}: {r.case.describe()}: {r.msg}")
    print(f"value-level findings (structurally valid files): {len(values)}")
    for r in values:
        print(f"  {r.cls}: {r.case.describe()}: {r.msg}")
    if args.json:
        rows = lambda rs: [{"class": r.cls, "case": r.case.describe(), "msg": r.msg} for r in rs]  # noqa: E731
        args.json.write_text(json.dumps({"cases": len(results), "seconds": round(took), "counts": c,
                                         "against_reader": rows(bad), "value_level": rows(values)}, indent=1))
    broke = [r for r in values if r.cls in FAILING]  # a raw error, blow-up, crash or hang on any file
    return 1 if bad or broke else 0


if __name__ == "__main__":
    sys.exit(main())
