"""weightstream: run language models larger than memory, from GGUF files, with fused quantized kernels.

The repository's engine/ and kernels/ folders install as the subpackages weightstream.engine (files,
the forward pass, expert streaming, the API and CLI) and weightstream.kernels (math on quantized
blocks; it never imports the engine). This file only makes the top-level names cheap to reach.

    from weightstream import Engine
    import weightstream.kernels as kernels
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("weightstream")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled checkout
    __version__ = "0+unknown"

__all__ = ["Engine", "__version__"]


def __getattr__(name):  # lazy: `import weightstream` stays cheap for the CLI's --help
    if name == "Engine":
        from .engine.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'weightstream' has no attribute {name!r}")
