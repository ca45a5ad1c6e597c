"""The seam between the model and wherever its experts come from.

The model sees routed experts (and, with stream="ffn", dense FFNs as expert 0 of their layer) only
through an ExpertSource. Two implement it: ResidentExperts here (views of the file's memory map,
nothing to wait for) and engine/stream/store.py's ExpertStore (slots filled by reader threads).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from ...kernels import QTensor
from .weights import ModelWeights

# One batch from fetch: [(expert id, (gate, up, down)), ...]
ExpertBatch = list[tuple[int, tuple[QTensor, QTensor, QTensor]]]


class ExpertSource(Protocol):
    def fetch(self, layer: int, experts: Iterable[int]) -> Iterator[ExpertBatch]:
        """Yield batches covering `experts` (distinct ids): those ready first, then the rest as
        they become ready. A batch's QTensors are valid until the next step of the loop."""

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """A hint: these experts of `layer` are likely next; start getting them if that costs the
        caller nothing. Returns how many were started (0 where there is nothing to start)."""


class ResidentExperts:
    """Experts as views of the file's memory map, in the order asked."""

    def __init__(self, weights: ModelWeights):
        self.w = weights

    def fetch(self, layer: int, experts: Iterable[int]) -> Iterator[ExpertBatch]:
        moe = self.w.layers[layer].moe
        yield [(int(e), (moe.gate_exps[e], moe.up_exps[e], moe.down_exps[e])) for e in experts]

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        return 0  # already in memory
