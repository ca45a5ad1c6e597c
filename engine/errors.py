"""Every error weightstream raises on purpose, under one base class, so a caller (or the CLI) can
catch WeightstreamError and know the message names the problem (file, tensor, offset, expected
vs found). Each also derives from the builtin a caller would expect (a bad file is a ValueError,
a failed read an OSError), so code written against those keeps working.

This module imports nothing of the engine: every layer may raise these.
"""
from __future__ import annotations


class WeightstreamError(Exception):
    """Base of the errors below."""


class GGUFError(WeightstreamError, ValueError):
    """A GGUF file that cannot be used: names the file and what is wrong."""


class ConfigError(WeightstreamError, ValueError):
    """Metadata that does not describe a model we can run."""


class BudgetError(WeightstreamError, MemoryError):
    """The memory budget cannot hold what the model must keep in memory."""


class ExpertReadError(WeightstreamError, OSError):
    """A read of an expert failed or came back short: names the file, tensor, offset and sizes."""


class ExpertIndexError(WeightstreamError, KeyError):
    """An expert asked of the store that the file does not hold (layer or expert out of range)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class ContextFullError(WeightstreamError, RuntimeError, ValueError):
    """The tokens asked for do not fit the context (n_ctx) the model was loaded with (a ValueError
    too where the caller's arguments asked for more than the context holds)."""


class RoutingTraceError(WeightstreamError, ValueError):
    """A routing trace file that cannot be replayed on this model."""


class StageFailedError(WeightstreamError, RuntimeError):
    """A pipeline stage died, left with its node, or did not answer within the timeout."""


class NonFiniteError(WeightstreamError, FloatingPointError):
    """A forward pass produced NaN or Inf logits: names the first layer whose output (the residual)
    went non-finite (or the output head) and the token position, instead of sampling from them."""


class ExpertReadTimeout(ExpertReadError, TimeoutError):
    """No read of the experts a layer waits for finished within the store's timeout (a stuck disk or
    network filesystem): names the file, the layer and the experts."""


class ModelFileChangedError(WeightstreamError, OSError):
    """The model file was replaced, rewritten or truncated while an engine was using it: names the
    file and what changed (size, modification time, inode, device) since it was loaded."""


class NonFiniteWeightsError(WeightstreamError, ValueError):
    """Weights read from the file hold a NaN or infinite block scale: names the file, the tensor,
    the expert and the block."""
