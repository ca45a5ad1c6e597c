"""weightstream's engine: GGUF models, the forward pass, expert streaming, the API and CLI."""
from __future__ import annotations

__all__ = ["Engine"]


def __getattr__(name):  # lazy: `import weightstream.engine` stays cheap for the CLI's --help
    if name == "Engine":
        from .runtime.engine import Engine

        return Engine
    raise AttributeError(name)
