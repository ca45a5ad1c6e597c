"""The argparse pieces every command shares: a parser whose help shows each option's default and
whose errors are one line, and the argument types that refuse a bad value before anything loads."""
from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each option's help, unless the help already says what the default
    is (None defaults are described in words there: "default: available cores") or the option is a
    flag (store_true's False says nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unsaid = any(action.default is v for v in (None, False, argparse.SUPPRESS))  # `is`: 0.0 == False
        if "default" in text.lower() or unsaid or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with HelpFormatter, and one-line errors: "weightstream run: error:
    argument -t/--threads: must be an integer >= 1, got '0' (weightstream run --help)". Subparsers
    made from it are Parsers too (add_subparsers passes type(self) on)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = _int_at_least(1)  # threads, sizes, counts that must be there
count = _int_at_least(0)  # tokens to generate, where 0 is a valid (empty) request


def model_path(text: str) -> str:
    """A GGUF path: a directory gets one clear line here (opening it would say "[Errno 21] Is a
    directory"); a missing file is left to GGUFFile, whose message names it."""
    if os.path.isdir(text):
        ggufs = sorted(n for n in os.listdir(text) if n.endswith(".gguf"))
        hint = f"; it holds {', '.join(ggufs[:3])}{' ...' if len(ggufs) > 3 else ''}" if ggufs else \
            "; it holds no .gguf file (a Hugging Face directory? weightstream convert writes one)"
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a GGUF file{hint}")
    return text


def memory_budget(text: str) -> str | None:
    """A budget as Engine.load takes it ("3GiB", bytes), or "none": no budget, everything resident
    (as `weightstream demo --memory-budget none`)."""
    return None if text.strip().lower() == "none" else text
