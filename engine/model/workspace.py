"""The per-step buffers of a forward pass, allocated once per Model (llama2.c's RunState).

work_buffers(cfg, n_batch, n_ctx) is the one description of every float32 buffer a forward pass
of up to n_batch tokens uses: those a Workspace holds (allocated once, reused by every call) and
those a prefill call still allocates for itself (counted only: attention scores over the whole
context for every token, each expert's outputs on its rows, the logits of every position would
make held buffers of n_batch times that size). The memory budget's work_bytes
(engine/stream/budget.py) sums this same list, so what it counts and what is allocated cannot
drift apart.

Buffers are flat; `take(name, rows, cols)` hands out the first rows*cols elements as a C-contiguous
float32[rows, cols] view (what the kernels' `out` arguments need), or a new array where a caller
asks for more than the buffer holds (a forward call of more tokens than n_batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, int]  # (rows, cols) at its largest
    held: bool  # True: a Workspace holds it; False: allocated by each prefill call (counted only)

    @property
    def nbytes(self) -> int:
        return 4 * self.shape[0] * self.shape[1]


def work_buffers(cfg: ModelConfig, n_batch: int, n_ctx: int) -> list[Buffer]:
    """Every float32 buffer of one forward pass of up to n_batch tokens at context n_ctx."""
    E, H, Hkv, D, V = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_vocab
    ff = max(cfg.n_ff, cfg.n_ff_exp, cfg.n_ff_shexp)  # the widest FFN: dense, routed or shared
    k = max(1, cfg.n_expert_used)  # experts per token (1: a dense FFN streamed as expert 0)
    n, m = n_batch, max(n_batch, k)  # m: rows of the FFN buffers, also a decode step's k experts
    q_cols = (2 if cfg.flags.gated_attention else 1) * H * D  # gated attention: each head's [q; gate]
    return [
        Buffer("norm", (n, E), True),  # each block's normed input h
        Buffer("qkv", (n, q_cols + 2 * Hkv * D), True),  # Q (and gates), K and V projections
        Buffer("q", (n, H * D), True),  # Q apart from its gates (prefill, gated); decode: Q normed and rotated
        *linear_attention_buffers(cfg, n),
        Buffer("attn", (n, H * D), True),  # attention output, before attn_output
        Buffer("scores", (H, n_ctx), True),  # attention's scores: per head (decode), per thread (prefill)
        Buffer("attn_proj", (n, E), True),  # attn_output's result, added to the residual
        Buffer("gate_up", (m, 2 * ff), True),  # gate then up rows (of every expert, batched decode)
        Buffer("act", (m, ff), True),  # SwiGLU output
        Buffer("ffn_out", (n, E), True),  # a dense, shared or streamed FFN's down projection
        Buffer("experts_in", (2 * k, E), True),  # decode: the token once per gate and up matrix
        Buffer("experts_out", (k, E), True),  # decode: each routed expert's output
        Buffer("moe_out", (n, E), True),  # the weighted sum of the experts (+ shared expert)
        Buffer("router_probs", (n, cfg.n_expert), True),  # the router's logits, then probabilities
        Buffer("residual", (n, E), False),  # embed's rows: the residual stream of the call
        Buffer("qk_copies", (n, (H + Hkv) * D), False),  # prefill: Q and K made contiguous
        Buffer("experts_rows", (n * k, E), False),  # prefill: each expert's outputs on its rows
        Buffer("logits", (n, V), False),  # returned to the caller, every position with all_logits
    ]


def linear_attention_buffers(cfg: ModelConfig, n: int) -> list[Buffer]:
    """A Gated DeltaNet layer's buffers (hybrids only; its state is in engine/model/state.py)."""
    d = cfg.linear
    if d is None:
        return []
    return [
        Buffer("linear_in", (n, d.conv_dim + d.value_dim + 2 * d.n_v_heads), True),  # qkv, z, beta, alpha
        Buffer("linear_conv", (n, d.conv_dim), True),  # the causal conv's output: q, k, v
        Buffer("linear_core", (n, d.value_dim), True),  # the delta rule's output per value head
        Buffer("linear_normed", (n, d.value_dim), True),  # after the gated RMSNorm, before ssm_out
        Buffer("linear_gate_copy", (n, d.value_dim), False),  # prefill: z made contiguous for the norm
    ]


class Workspace:
    """The held buffers of work_buffers(cfg, n_batch, n_ctx), allocated once."""

    def __init__(self, cfg: ModelConfig, n_batch: int, n_ctx: int):
        self.n_batch = n_batch
        self.buffers = {b.name: np.empty(b.shape[0] * b.shape[1], dtype=np.float32)
                        for b in work_buffers(cfg, n_batch, n_ctx) if b.held}
        # (name, rows, cols) -> its view, made once: a decode step asks for the same few hundred
        # times, and a lookup costs less than slicing and reshaping (or than np.empty)
        self.views: dict[tuple[str, int, int], np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def take(self, name: str, rows: int, cols: int) -> np.ndarray:
        """float32[rows, cols], C-contiguous: a view of buffer `name` (its contents are whatever
        the last user left), or a new array where the buffer is too small."""
        key = (name, rows, cols)
        view = self.views.get(key)
        if view is None:
            buf = self.buffers[name]
            if rows * cols > buf.size:
                return np.empty((rows, cols), dtype=np.float32)
            view = self.views[key] = buf[:rows * cols].reshape(rows, cols)
        return view
