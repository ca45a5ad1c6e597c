"""Per-layer state: what each layer's mixer keeps from one token to the next.

Every layer owns its own state object, allocated once when the Model is built. Today every layer
is full attention and keeps a KVCache; hybrid models will add layers with a recurrent state of
fixed size, chosen here by layer. `layer_state` allocates a layer's state and `layer_state_bytes`
says how much it takes without allocating it; both go through the same state class and its
`shapes`, so the memory budget (engine/stream/budget.py) counts exactly what the Model allocates.
"""
from __future__ import annotations

import numpy as np

from .config import ATTENTION, ModelConfig


class KVCache:
    """Keys and values of every position so far, for one attention layer (zeroed at allocation)."""

    @staticmethod
    def shapes(cfg: ModelConfig, n_ctx: int) -> dict[str, tuple[int, ...]]:
        """The float32 arrays this state holds, by attribute name."""
        kv = (n_ctx, cfg.n_head_kv, cfg.head_dim)
        return {"k": kv, "v": kv}

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shapes = self.shapes(cfg, n_ctx)
        self.k = np.zeros(shapes["k"], dtype=np.float32)  # float32[n_ctx, n_head_kv, head_dim]
        self.v = np.zeros(shapes["v"], dtype=np.float32)  # float32[n_ctx, n_head_kv, head_dim]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# layer type (ModelConfig.layer_types) -> the state its mixer keeps between tokens
STATE_OF_LAYER_TYPE = {ATTENTION: KVCache}


def state_class(cfg: ModelConfig, layer: int) -> type[KVCache]:
    """The kind of state layer `layer`'s mixer keeps."""
    return STATE_OF_LAYER_TYPE[cfg.layer_types[layer]]


def layer_state(cfg: ModelConfig, layer: int, n_ctx: int) -> KVCache:
    """Layer `layer`'s state for a context of n_ctx positions, allocated."""
    return state_class(cfg, layer)(cfg, n_ctx)


def layer_state_bytes(cfg: ModelConfig, layer: int, n_ctx: int) -> int:
    """Bytes layer_state(cfg, layer, n_ctx) allocates (float32 arrays), without allocating them."""
    return sum(4 * int(np.prod(shape)) for shape in state_class(cfg, layer).shapes(cfg, n_ctx).values())


def state_bytes(cfg: ModelConfig, n_ctx: int, layers: range) -> int:
    """Bytes the states of `layers` take together."""
    return sum(layer_state_bytes(cfg, i, n_ctx) for i in layers)
