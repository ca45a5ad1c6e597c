"""`weightstream bench kernels | decode | bandwidth | io`: the argparse wiring (engine/cli/main.py calls
register(sub)). Tables go to stdout as markdown; progress and the machine's load go to stderr."""
from __future__ import annotations

import argparse
import sys

from ...kernels.backends import BACKENDS
from .parser import count, model_path, positive_int


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    """"14336x4096,768x2048" -> ((14336, 4096), (768, 2048)): W's rows x cols."""
    try:
        return tuple(tuple(int(d) for d in s.lower().split("x")) for s in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are ROWSxCOLS, comma-separated: {text!r}") from None


def register(subparsers) -> None:
    """Add the `bench` command and its three subcommands to the top-level subparsers."""
    p = subparsers.add_parser("bench", help="kernel throughput, prefill/decode speed, memory bandwidth")
    sub = p.add_subparsers(dest="bench_command", required=True)

    k = sub.add_parser("kernels", help="quantized matmul throughput against memory bandwidth")
    k.add_argument("--types", type=_names, default=None, help="e.g. Q2_K,Q4_K (default: all seven)")
    k.add_argument("--shapes", type=_shapes, default=None, help="W rows x cols, e.g. 14336x4096,768x2048 (default: the suite's dense and expert shapes)")
    k.add_argument("--threads", type=_ints, default=None, help="e.g. 1,2 (default: 1,2)")
    k.add_argument("--n", type=_ints, default=None, help="batch sizes, e.g. 1,8,64,512 (default: 1,8,64,512)")
    k.add_argument("--backends", type=_names, default=None, help="e.g. cython,numba,numpy; auto also allowed (default: cython,numba,numpy)")
    k.add_argument("--repeats", type=positive_int, default=None, help="timed calls per row (default: by size)")
    k.add_argument("--warm", action="store_true", help="reuse one copy of W (cache-resident when small)")
    k.add_argument("--quick", action="store_true", help="Q2_K, dense shapes + one expert shape, n=1,64")
    k.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON (default: none)")
    k.add_argument("--write-table", action="store_true",
                   help="store the fastest backend per (type, n) for backend='auto' "
                        "(~/.cache/weightstream/backend_table-<cpu>.json)")
    k.set_defaults(func=cmd_bench_kernels)

    d = sub.add_parser("decode", help="prefill (pp) and decode (tg) tokens/s, as llama-bench")
    d.add_argument("model", nargs="?", default="demo", type=model_path, help="GGUF path, or 'demo' (default): SmolLM2-135M Q4_1")
    d.add_argument("-p", "--n-prompt", type=count, default=64, help="prompt tokens: the pp test (0: skip it)")
    d.add_argument("-n", "--n-gen", type=count, default=64, help="generated tokens: the tg test (0: skip it)")
    d.add_argument("-t", "--threads", type=_ints, default=None, help="e.g. 2 or 1,2 (default: available cores)")
    d.add_argument("--backend", default="auto", choices=BACKENDS, help="matmul kernels (kernels/backends.py)")
    d.add_argument("-r", "--repetitions", type=positive_int, default=3, help="timed runs of each test, after one untimed warm-up run")
    d.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON (default: none)")
    d.set_defaults(func=cmd_bench_decode)

    o = sub.add_parser("io", help="disk read bandwidth: parallel cold preads of expert-sized chunks")
    o.add_argument("file", help="a large file on the disk to measure (e.g. a GGUF); see --make-gib")
    o.add_argument("--make-gib", type=float, default=None, help="first write FILE: this many GiB of random bytes (default: FILE exists)")
    o.add_argument("--chunk-mib", type=float, default=None, help="bytes per read (default: one Q2_K 4096x1536 expert)")
    o.add_argument("--threads", type=_ints, default=(1, 2, 4), help="reader threads, one measurement each")
    o.add_argument("--reads", type=positive_int, default=256, help="reads per measurement (each at a new offset)")
    o.add_argument("--warm", action="store_true", help="leave the page cache as it is")
    o.add_argument("--drop-all", action="store_true", help="also empty the whole page cache (root)")
    o.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON (default: none)")
    o.set_defaults(func=cmd_bench_io)

    b = sub.add_parser("bandwidth", help="memory read bandwidth (the ceiling for matrix-vector kernels)")
    b.add_argument("--threads", type=_ints, default=(1, 2), help="threads, one measurement each")
    b.add_argument("--size-mib", type=positive_int, default=1024, help="the buffer read")
    b.add_argument("--repeats", type=positive_int, default=5, help="timed reads (the best is reported)")
    b.set_defaults(func=cmd_bench_bandwidth)


def cmd_bench_kernels(args) -> int:
    from ...kernels import bench

    # Each row is printed once, on stdout, as its case finishes (a full suite takes minutes): the
    # table's header first, the rows as they come, then the machine and its bandwidth, known at the
    # end. (The rows used to go to stderr as progress and again in the table: twice on a terminal.)
    print(bench.TABLE_HEADER, flush=True)
    results = bench.run_suite(args.types, args.shapes, args.n, args.threads, args.backends, args.quick,
                              repeats=args.repeats, cold=not args.warm,
                              progress=lambda r: print(bench.format_row(r), flush=True))
    preamble = bench.format_table(dict(results, results=[]))  # the machine lines, then the empty table
    print("\n" + preamble[:-len(bench.TABLE_HEADER)].rstrip())
    if args.json:
        print(f"wrote {bench.save_results(results, args.json)}", file=sys.stderr)
    if args.write_table:
        print(f"wrote {bench.write_backend_table(results)}", file=sys.stderr)
    return 0


def cmd_bench_decode(args) -> int:
    from ...kernels.bench import save_results

    from ..tools.bench_decode import bench_decode, format_decode

    path = args.model
    if path == "demo":
        from ..tools.assets import demo_model_path

        path = demo_model_path()
    results = [bench_decode(path, args.n_prompt, args.n_gen, t, args.backend, args.repetitions)
               for t in (args.threads or (None,))]
    print(format_decode(results))
    if args.json:
        save_results({"decode": results}, args.json)
    return 0


def cmd_bench_bandwidth(args) -> int:
    from ...kernels.bench import machine_info, memory_bandwidth

    m = machine_info()
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}, load {m['loadavg'][0]:.2f}")
    for t in args.threads:
        bw = memory_bandwidth(t, args.size_mib << 20, args.repeats)
        print(f"memory read bandwidth, {t} thread{'s' if t > 1 else ''}: {bw / 1e9:.1f} GB/s")
    return 0


def cmd_bench_io(args) -> int:
    from ...kernels.bench import save_results

    from ..stream.disk import EXPERT_CHUNK, disk_bandwidth, format_io, make_scratch_file

    if args.make_gib:
        print(f"writing {args.make_gib} GiB to {args.file}", file=sys.stderr)
        make_scratch_file(args.file, int(args.make_gib * 2**30))
    chunk = int(args.chunk_mib * 2**20) if args.chunk_mib else EXPERT_CHUNK
    results = [disk_bandwidth(args.file, chunk, t, args.reads, seed=t, cold=not args.warm, drop_all=args.drop_all)
               for t in args.threads]
    print(format_io(results))
    if args.json:
        save_results({"io": results}, args.json)
    return 0
