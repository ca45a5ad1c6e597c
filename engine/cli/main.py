"""The `weightstream` command (also `python -m weightstream`): the parser, one module per command
group (generate, inspect, convert, demo, bench), and the one place errors become messages."""
from __future__ import annotations

import argparse
import sys

from . import bench, convert, demo, generate, inspect, serve
from .options import sampling_options
from .parser import Parser
from ..errors import WeightstreamError


def build_parser() -> argparse.ArgumentParser:
    from weightstream import __version__

    parser = Parser(prog="weightstream", description="Run GGUF language models, streaming experts from flash.")
    parser.add_argument("--version", action="version", version=f"weightstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.register(sub)  # run, chat
    inspect.register(sub)  # info, perplexity, profile
    convert.register(sub)  # convert, quantize, imatrix
    demo.register(sub)  # demo, synth
    bench.register(sub)  # bench kernels | decode | bandwidth | io
    serve.register(sub)  # serve: the OpenAI-compatible server (engine/serve/)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "perplexity":
        args.ctx = args.ctx_size = args.ctx_size or 512
    try:
        if hasattr(args, "temp"):  # a bad sampling option: refused before the model loads
            sampling_options(args)
        return args.func(args)
    except (WeightstreamError, OSError, ValueError, RuntimeError, MemoryError) as e:  # ours, and the
        # builtins a library below may raise for a bad file or option
        where = getattr(args, "ray_address", None)
        if isinstance(e, ConnectionError) and where is not None:
            # Ray's "no running instance" text points at its own `ray start --address` flag, not ours
            detail = "no running Ray instance found" if "--address" in str(e) else str(e)
            print(f"weightstream: error: no Ray cluster at --ray-address {where} ({detail}); start one with "
                  "`ray start --head`, or leave --ray-address out (with --stages) for a local Ray", file=sys.stderr)
        else:
            print(f"weightstream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
