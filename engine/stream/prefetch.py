"""Prediction for the expert source: which experts the next layer will ask for, guessed before its
routing is known, and hinted to the source so their reads overlap this layer's compute.

The model tells the prefetcher one thing, `on_residual(layer, x)`: layer's own reads are queued and
x is the residual after its attention (decode only: one token). The residual changes little from
one layer to the next, so layer + 1's router applied to it (after layer + 1's FFN norm) ranks that
layer's experts well; the top `k` are hinted, best first. (The other half of prefetching, queueing
all of a layer's misses as soon as its routing is known, is the store's own fetch.)
"""
from __future__ import annotations

import numpy as np

from ..model.config import ModelConfig
from ..model.experts import ExpertSource
from ..model.forward import rms_norm
from ..model.weights import ModelWeights


class LookaheadPrefetcher:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, source: ExpertSource, k: int,
                 stream_ffn: bool = False):
        self.cfg, self.w, self.source, self.k = cfg, weights, source, k
        self.stream_ffn = stream_ffn  # a dense FFN is expert 0 of its layer: always the guess

    def on_residual(self, layer: int, x: np.ndarray) -> None:
        """x: float32[1, n_embd]. Its norm and router logits are small new arrays (the model's
        workspace still holds this layer's FFN input)."""
        nxt = layer + 1
        moe = self.w.layers[nxt].moe
        if moe is None:
            if self.stream_ffn:
                self.source.prefetch(nxt, [0])
            return
        logits = moe.router(rms_norm(x, self.w.layers[nxt].ffn_norm, self.cfg.rms_eps))  # [1, n_expert]
        k = min(self.k, logits.shape[1])
        guess = np.argpartition(-logits[0], k - 1)[:k]
        self.source.prefetch(nxt, guess[np.argsort(-logits[0, guess], kind="stable")])
