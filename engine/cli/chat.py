"""`weightstream chat`'s loop, as ollama's `run` behaves: Ctrl-C stops the reply being written and
returns to the prompt (at the prompt it clears the line); /bye or Ctrl-D ends the session with a
newline; /clear forgets the conversation (the --system message stays); an empty line asks again;
a line ending in a backslash, or a block between two \"\"\" lines, is one multi-line message;
readline gives line editing and a history kept in the cache directory across sessions."""
from __future__ import annotations

import sys
from pathlib import Path

HELP = ('/bye (or Ctrl-D): quit; /clear: forget the conversation; Ctrl-C: stop the reply; '
        'end a line with \\ or wrap lines in """ for a multi-line message')
PROMPT, MORE = ">>> ", "... "
HISTORY_LINES = 1000


def history_path() -> Path:
    from ...kernels.backends import cache_dir

    return cache_dir() / "chat_history"


def start_history(path: Path):
    """readline's line editing and history (ours, loaded from path); returns a function that saves
    the history, or None where readline is missing (Windows without pyreadline) or the input is not
    a terminal (a pipe has nothing to edit, and its lines are not the user's to remember)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(path)
    except OSError:  # first session: no file yet
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:  # a read-only cache must not lose the conversation's last word
            print(f"weightstream chat: history not saved to {path}: {e}", file=sys.stderr)

    return save


def read_message(read=input) -> str | None:
    """One user message, or None at end of input. Lines ending in a backslash continue on the next
    line; a line starting with \"\"\" opens a block closed by a line ending in \"\"\" (the quotes
    are not part of the message). Ctrl-C at the prompt clears what was typed and asks again."""
    lines: list[str] = []
    block = False
    while True:
        try:
            line = read(MORE if lines or block else PROMPT)
        except EOFError:
            return None
        except KeyboardInterrupt:  # as in a shell: drop the line, a fresh prompt
            print("^C" if not lines else "", file=sys.stderr)
            lines, block = [], False
            continue
        if block:
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
        elif not lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""') and rest.strip() != "":  # """one line"""
                return rest.rstrip()[:-3]
            block, lines = True, [rest] if rest else []
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


def chat_loop(engine, system: str | None, n_predict: int, sampling: dict, read=input, write=None) -> None:
    """The conversation: read a message, stream the reply, until /bye or end of input. write(piece)
    prints a piece of the reply (default: stdout, flushed)."""
    write = write or (lambda piece: print(piece, end="", flush=True))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        text = read_message(read)
        if text is None or text.strip() == "/bye":
            print()  # the shell's prompt starts on a line of its own
            return
        if not text.strip():
            continue
        if text.strip() == "/clear":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.strip() in ("/?", "/help"):
            print(HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply: list[str] = []
        pieces = engine.chat(messages, n_predict, stream=True, **sampling)
        try:
            for piece in pieces:
                reply.append(piece)
                write(piece)
        except KeyboardInterrupt:  # stop this reply only; what was shown stays in the conversation
            pieces.close()  # ends the generation: the engine is free for the next message
            print(" ^C (reply stopped)", end="", file=sys.stderr, flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
