"""Per-layer state: what each layer's mixer keeps from one token to the next.

Every layer owns its own state object, allocated once when the Model is built, chosen by the layer's
type: a full-attention layer keeps a KVCache that grows with the context; a Gated DeltaNet layer
(hybrids) keeps a RecurrentState of fixed size whatever the context. `layer_state` allocates a layer's state and `layer_state_bytes`
says how much it takes without allocating it; both go through the same state class and its
`shapes`, so the memory budget (engine/stream/budget.py) counts exactly what the Model allocates.
"""
from __future__ import annotations

import numpy as np

from .config import ATTENTION, LINEAR_ATTENTION, ModelConfig


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


class RecurrentState:
    """A Gated DeltaNet layer's memory of every position so far, of fixed size: the last
    conv_kernel - 1 inputs of its causal conv and the delta rule's matrix per value head.

    Unlike a KV cache it cannot be rewound: it describes exactly `n_seen` positions, so a forward
    pass must continue at position n_seen, or start again at 0 (which zeroes it)."""

    @staticmethod
    def shapes(cfg: ModelConfig, n_ctx: int) -> dict[str, tuple[int, ...]]:
        d = cfg.linear
        return {"conv": (d.conv_kernel - 1, d.conv_dim), "ssm": (d.n_v_heads, d.k_head_dim, d.v_head_dim)}

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shapes = self.shapes(cfg, n_ctx)
        self.conv = np.zeros(shapes["conv"], dtype=np.float32)  # float32[conv_kernel - 1, conv_dim]
        self.ssm = np.zeros(shapes["ssm"], dtype=np.float32)  # float32[n_v_heads, k_head_dim, v_head_dim]
        self.n_seen = 0  # positions folded into the state

    def advance(self, start: int, n: int) -> None:
        """Check that positions start..start+n-1 continue this state (start 0: a new sequence,
        the state is zeroed), and count them as seen. Called before the state is updated."""
        if start == 0:
            self.conv.fill(0)
            self.ssm.fill(0)
        elif start != self.n_seen:
            raise ValueError(f"a recurrent (linear-attention) layer holds {self.n_seen} positions and cannot "
                             f"continue at position {start}: evaluate from position 0 again")
        self.n_seen = start + n

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


# layer type (ModelConfig.layer_types) -> the state its mixer keeps between tokens
STATE_OF_LAYER_TYPE = {ATTENTION: KVCache, LINEAR_ATTENTION: RecurrentState}


def state_class(cfg: ModelConfig, layer: int) -> type[KVCache] | type[RecurrentState]:
    """The kind of state layer `layer`'s mixer keeps."""
    return STATE_OF_LAYER_TYPE[cfg.layer_types[layer]]


def layer_state(cfg: ModelConfig, layer: int, n_ctx: int) -> KVCache | RecurrentState:
    """Layer `layer`'s state for a context of n_ctx positions, allocated."""
    return state_class(cfg, layer)(cfg, n_ctx)


def layer_state_bytes(cfg: ModelConfig, layer: int, n_ctx: int) -> int:
    """Bytes layer_state(cfg, layer, n_ctx) allocates (float32 arrays), without allocating them."""
    return sum(4 * int(np.prod(shape)) for shape in state_class(cfg, layer).shapes(cfg, n_ctx).values())


def state_bytes(cfg: ModelConfig, n_ctx: int, layers: range) -> int:
    """Bytes the states of `layers` take together."""
    return sum(layer_state_bytes(cfg, i, n_ctx) for i in layers)
