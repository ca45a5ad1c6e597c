"""`weightstream serve MODEL`: the OpenAI-compatible server of engine/serve/ on uvicorn, with every
load option of `run` (--memory-budget, --stream, --cache-policy, --prefetch, ...)."""
from __future__ import annotations

import sys
from pathlib import Path

from .options import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a live page (needs .[serve])")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait while one generates; more get 503 (default: %(default)s)")
    p.add_argument("--alias", default=None, help="the model's name in /v1/models (default: the file's name)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise RuntimeError(f"serve needs the serve extra ({e.name} is missing): pip install 'weightstream[serve]' "
                           "(or pip install -e '.[serve]' in a clone)") from None
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Ctrl-C: uvicorn waits for open responses before it stops; cancelling the generations
            # ends them at their next token (a stream would otherwise run to max_tokens)
            app.state.worker.cancel_all()
            super().handle_exit(sig, frame)

    with load_engine(args, profile=True) as engine:  # the profiler feeds the page's per-layer figures
        app = create_app(engine, args.alias or Path(args.model).stem, args.max_queue)
        print(f"weightstream serve: http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)).run()
    return 0
