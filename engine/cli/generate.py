"""`weightstream run` and `weightstream chat`: generate from a prompt, or chat turn by turn (the loop:\nengine/cli/chat.py)."""
from __future__ import annotations

import sys

from .options import add_model_options, add_sampling_options, load_engine, print_speed, sampling_options


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt")
    add_model_options(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    add_model_options(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation (default: none)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat, n_predict=512)


def cmd_run(args) -> int:
    with load_engine(args) as engine:
        if args.chat_template:
            pieces = engine.chat([{"role": "user", "content": args.prompt}], args.n_predict, stream=True,
                                 **sampling_options(args))
        else:
            pieces = engine.stream(args.prompt, args.n_predict, **sampling_options(args))
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        print_speed(engine)
    return 0


def cmd_chat(args) -> int:
    from .chat import HELP, chat_loop, history_path, start_history

    sampling = sampling_options(args)
    with load_engine(args) as engine:
        save_history = start_history(history_path())
        print(f"weightstream chat: {HELP}", file=sys.stderr)
        try:
            chat_loop(engine, args.system, args.n_predict, sampling)
        finally:
            if save_history:
                save_history()
    return 0
