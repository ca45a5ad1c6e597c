"""The forward pass: embedding, each layer's token mixer with its state (attention over a KV cache,
or Gated DeltaNet linear attention over a recurrent state), dense or MoE FFN, head.

Works on float32 NumPy arrays. Knows nothing about I/O: weights come from weightstream.engine.model.weights,
routed experts through `self.experts.fetch(layer, expert_ids)`, an ExpertSource (engine/model/experts.py):
the file's memory map (ResidentExperts) or an ExpertStore that reads them ahead of use (engine/stream/store.py). The
small per-token operations (norms, rope, SwiGLU, one-token attention) run in weightstream.kernels._ops, one
pass each into our own buffers. Buffers live in the Model's Workspace (engine/model/workspace.py),
allocated once and reused by every call, so that a decode step allocates almost nothing (the
residual from embed, router probabilities, the logits it returns); each layer's state between
tokens (its KV cache) is its own object from engine/model/state.py, allocated once too.
kernels/reference/ops.py holds the NumPy versions of the small operations, the reference they are tested
against, and the prefill attention (a batched matmul that BLAS does best).
"""
from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType

from ... import kernels
from ...kernels import QTensor, _deltanet, _ops
from ...kernels.blas import one_blas_thread
from ...kernels.reference.ops import Rope, sigmoid

from .config import ROPE_NEOX, ModelConfig
from .decode_plan import DecodePlan
from .experts import ExpertSource, ResidentExperts
from .state import layer_state
from .workspace import Workspace
from .weights import FFN, GatedDeltaNetWeights, LayerWeights, ModelWeights, MoEWeights
from ..errors import ContextFullError


F32 = GGMLQuantizationType.F32
PREFILL_BATCH = 256  # prompt tokens per forward call: bounds the attention score buffers


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm of each row of x times weight (llama.cpp rms_norm then mul), into out (None: a new array)."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    elif not out.flags.c_contiguous:  # reshape would copy and the result would be lost
        raise ValueError("rms_norm: out must be C-contiguous")
    _ops.rms_norm_into(x2, weight, eps, out.reshape(x2.shape))
    return out


class Model:
    """A decoder-only transformer with its own per-layer state (a KV cache per attention layer).

    forward(tokens, pos) appends len(tokens) positions to the cache starting at `pos` and returns
    logits for the last token (or for every token with all_logits=True). It is embed, run_layers,
    head: a pipeline stage (engine/runtime/distributed.py) holds the weights and states of a slice of
    the layers only (weights.layer_range) and calls run_layers on the residual it is sent.
    """

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, n_ctx: int,
                 threads: int | None = None, backend: str = "auto", experts=None, stream_ffn: bool = False,
                 prefetcher=None, profiler=None, n_batch: int = PREFILL_BATCH, routing=None, routing_trace=None):
        self.cfg, self.w = cfg, weights
        # experts.fetch(layer, ids) -> (id, (gate, up, down)) QTensors: the file's memory map by
        # default, or an ExpertStore reading them ahead of use (engine/stream/store.py)
        self.experts: ExpertSource = experts or ResidentExperts(weights)
        self.stream_ffn = stream_ffn  # dense FFNs come from self.experts too (expert 0 of their layer)
        # told the residual once layer i's own reads are queued (on_residual), to guess what layer
        # i + 1 needs and hint the expert source (engine/stream/prefetch.py); None: no lookahead
        self.prefetcher = prefetcher
        self.profiler = profiler
        # benchmarks (engine/observe/routing.py): a source of expert choices used instead of the router's
        # (None: the router), and a RoutingTrace recording the choices made (None: not recorded)
        self.routing = routing
        self.routing_trace = routing_trace
        # imatrix collection (engine/tools/imatrix.py): told (layer, expert or None for a streamed dense
        # FFN, input rows, SwiGLU output) by expert_ffn; None: off
        self.observer = None
        self.n_ctx = n_ctx
        self.threads, self.backend = threads, backend
        self.layer_range = weights.layer_range  # the layers held (all, or a pipeline stage's slice)
        self.rope = Rope(cfg.n_rot, cfg.rope_base, n_ctx, cfg.flags.rope, cfg.rope_freq_scale, weights.rope_freqs)
        # layer index -> its state (engine/model/state.py), allocated once: the layers held only
        self.states = {i: layer_state(cfg, i, n_ctx) for i in self.layer_range}
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        self.kernel_threads = threads or kernels.default_threads()
        # the experts' matmuls go through the same dispatch object as the resident weights
        self.kernel = weights.kernel if weights.kernel is not None else kernels.backends.KernelCache(backend)
        # per-step buffers for calls of up to n_batch tokens (longer calls allocate what does not fit)
        self.work = Workspace(cfg, n_batch, n_ctx)
        self.attn_scores = self.work.take("scores", cfg.n_head, n_ctx)  # one-token attention scratch
        # routed_decode: layer -> its one-call kernel (routed_kernel; None: not applicable), and
        # the choice it writes, int64 / float32[1, n_expert_used] (record() copies it)
        self.routed_kernels: dict[int, tuple | None] = {}
        self.route_ids = np.empty((1, max(cfg.n_expert_used, 1)), dtype=np.int64)
        self.route_weights = np.empty((1, max(cfg.n_expert_used, 1)), dtype=np.float32)
        # decode steps' layers in one native call where they can be (decode_plan); False: the
        # plan is not built yet. fused_layers False keeps the per-layer path (tests compare both)
        self.fused_layers = True
        self._decode_plan: DecodePlan | None | bool = False

    # ---- one pass -----------------------------------------------------------------------------
    def forward(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        with one_blas_thread():  # NumPy's BLAS pool must not spin on our kernels' cores (kernels/blas.py)
            return self._forward(tokens, pos, all_logits)

    def _forward(self, tokens, pos: int, all_logits: bool) -> np.ndarray:
        """Logits of the tokens at pos.. (see forward). Non-finite logits raise NonFiniteError
        naming the first layer whose output went NaN / Inf (run_layers notes it) and the token
        position, instead of handing the sampler NaNs (it would pick token 0). The check is always
        on: _ops.first_nonfinite_row over the residual after each layer and over the logits, one
        vectorised pass each. Measured per decode step (one core, the call included): tests' tiny
        llama (2 layers, n_embd 64, 256-token vocabulary) ~1.5 us (0.45 us per layer and over the
        logits); SmolLM2-135M Q4_1 (30 layers, n_embd 576, 49152-token vocabulary) ~21 us (0.45 us
        per layer + 6.4 us over the logits): under 0.1% of its ~26 ms step."""
        tokens, positions = self.check_tokens(tokens, pos)
        prof = self.profiler
        t_forward = prof.begin_forward(len(tokens)) if prof is not None else 0.0
        x = self.embed(tokens)  # [n, n_embd], the residual stream (ours: updated in place)
        h = self.run_layers(x, positions)
        if prof is not None:
            prof.end_forward(len(tokens), t_forward)
        logits = self.head(x, all_logits, h)
        if _ops.first_nonfinite_row(logits) >= 0:
            raise nonfinite_error(self.nonfinite_at, logits, positions)
        return logits

    def check_tokens(self, tokens, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64[n], positions int64[n]) after checking they fit the context and vocabulary."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = len(tokens)
        if n == 0:
            raise ValueError("forward: no tokens")
        if pos + n > self.n_ctx:
            raise ContextFullError(f"context full: {pos} + {n} tokens exceed n_ctx={self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise ValueError(f"token id out of range [0, {self.cfg.n_vocab}): {tokens.min()}..{tokens.max()}")
        return tokens, np.arange(pos, pos + n, dtype=np.int64)

    def run_layers(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Layers layer_range on the residual x: float32[n, n_embd], updated in place (it must be
        writable and C-contiguous). Returns the scratch buffer h (the head reuses it). Sets
        self.nonfinite_at: (layer, token position) where the residual first held a NaN / Inf after
        a layer, None if it stayed finite (a NaN in the residual stays: x += f(x)), for the
        NonFiniteError of _forward; one pass over x per layer until one is found."""
        prof = self.profiler
        n, stop = len(x), self.layer_range.stop
        h = self.work.take("norm", n, x.shape[1])  # normed input of each block
        self.nonfinite_at = None
        plan = self.decode_plan() if n == 1 else None
        if plan is not None:  # every layer in one native call, the bits of the loop below
            row = plan.run(x, int(positions[0]))
            if row >= 0:
                self.nonfinite_at = (self.layer_range[row], int(positions[0]))
            return h
        for i in self.layer_range:
            layer = self.w.layers[i]
            t_layer = time.perf_counter() if prof is not None else 0.0
            self.norm(x, layer.attn_norm, h)
            if layer.linear is not None:
                x += self.linear_attention(i, layer.linear, h, positions)
            else:
                x += self.attention(i, layer, h, positions)
            self.norm(x, layer.ffn_norm, h)
            # after this layer's reads are queued, guess the next layer's experts from x (decode
            # only; not past this model's last layer: a pipeline's next stage has its own store)
            ahead = x if self.prefetcher is not None and i + 1 < stop and n == 1 else None
            if layer.moe is not None:
                x += self.moe(i, layer.moe, h, ahead, positions)
            elif self.stream_ffn:
                x += self.streamed_ffn(i, h, ahead)
            else:
                x += self.dense_ffn(layer.ffn, h)
            if self.nonfinite_at is None:
                row = _ops.first_nonfinite_row(x)
                if row >= 0:
                    self.nonfinite_at = (i, int(positions[row]))
            if prof is not None:
                prof.layer(i, t_layer, time.perf_counter())
        return h

    def decode_plan(self) -> DecodePlan | None:
        """The one-call path for a decode step's layers (engine/model/decode_plan.py), built at
        the first step; None where it does not apply: a layer it does not run, or this step
        needs the per-layer path (a profiler, an observer, a routing source or trace, a
        prefetcher, experts from a store, or fused_layers turned off)."""
        if not self.fused_layers or self.profiler is not None or self.observer is not None \
                or self.routing is not None or self.routing_trace is not None or self.prefetcher is not None \
                or type(self.experts) is not ResidentExperts:
            return None
        if self._decode_plan is False:
            self._decode_plan = DecodePlan.build(self)
        return self._decode_plan

    def head(self, x: np.ndarray, all_logits: bool = False, h: np.ndarray | None = None) -> np.ndarray:
        """Logits float32[n or 1, n_vocab] from the final residual x: float32[n, n_embd]; h: a
        scratch buffer of x's shape (None: allocated). The logits are a new array each call:
        callers keep them past the next step (Engine._forward_all, tests comparing steps)."""
        if h is None:
            h = np.empty_like(x)
        if not all_logits:
            x, h = x[-1:], h[-1:]
        return self.w.output(self.norm(x, self.w.output_norm, h))  # [n or 1, n_vocab]

    def norm(self, x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return rms_norm(x, weight, self.cfg.rms_eps, out)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """The residual stream float32[n, n_embd]: a new array each call (the caller owns it)."""
        if self.w.token_embd_dense is not None:
            return self.w.token_embd_dense[tokens]
        qt = self.w.token_embd  # only the looked-up rows are expanded
        return kernels.dequantize(QTensor(qt.qtype, (len(tokens), qt.shape[1]), qt.data[tokens]), self.threads)

    # ---- attention ----------------------------------------------------------------------------
    def attention(self, i: int, L: LayerWeights, h: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        n, H, Hkv, D = len(h), cfg.n_head, cfg.n_head_kv, cfg.head_dim
        gated = cfg.flags.gated_attention  # attn_q holds each head's [q; gate]: twice the rows
        q_cols = (2 if gated else 1) * H * D
        qkv = self.work.take("qkv", n, q_cols + 2 * Hkv * D)
        q, k, v = L.wqkv(h, qkv)  # [n, q_cols], [n, Hkv*D] x2: views of qkv (its blocks in turn)
        if n == 1:  # decode: everything between the two projections in one native call
            return self.attention_decode(i, L, qkv, int(positions[0]))
        gate = None
        if gated:
            qg = q.reshape(n, H, 2 * D)  # a view: q's rows are contiguous within each token
            q = self.work.take("q", n, H * D)
            q.reshape(n, H, D)[:] = qg[:, :, :D]
            gate = qg[:, :, D:]  # [n, H, D]: each head's gate, a strided view
        q, k = np.ascontiguousarray(q), np.ascontiguousarray(k)  # (a copy only when n > 1)
        if cfg.flags.qk_norm == "full":  # olmoe: norm over the whole projection, before splitting heads
            q, k = self.norm(q, L.q_norm, q), self.norm(k, L.k_norm, k)
        q, k, v = q.reshape(n, H, D), k.reshape(n, Hkv, D), v.reshape(n, Hkv, D)
        if cfg.flags.qk_norm == "head":  # qwen3: per-head norm
            q, k = self.norm(q, L.q_norm, q), self.norm(k, L.k_norm, k)
        neox = cfg.flags.rope == ROPE_NEOX
        _ops.rope_inplace(q, positions, self.rope.cos, self.rope.sin, cfg.n_rot, neox)
        _ops.rope_inplace(k, positions, self.rope.cos, self.rope.sin, cfg.n_rot, neox)
        start, end = positions[0], positions[-1] + 1
        cache = self.states[i]
        cache.k[start:end] = k
        cache.v[start:end] = v
        # prefill: every (token, head) against the cache up to the token's position, threaded, as
        # a decode step would at that position; the scores need a row per head of a kv head's
        # group, per thread
        out = self.work.take("attn", n, H * D)
        t = self.kernel_threads
        rows = t * (H // Hkv)
        scores = self.attn_scores if rows <= H else np.empty((rows, self.n_ctx), dtype=np.float32)
        _ops.attend_causal(q, cache.k, cache.v, positions, self.scale, out.reshape(n, H, D), scores, t)
        if gate is not None:  # per head: the decode call's row function, its bits
            _ops.sigmoid_gate_into(out.reshape(n * H, D), gate.reshape(n * H, D))
        return L.wo(out, self.work.take("attn_proj", n, cfg.n_embd))

    def attention_decode(self, i: int, L: LayerWeights, qkv: np.ndarray, pos: int) -> np.ndarray:
        """One token's attention from its QKV projection qkv: float32[1, q_cols + 2 Hkv D] (every
        Q/K/V layout the prefill path takes, in one row): the Q/K norms, RoPE, the cache write,
        attention over positions 0..pos and the output gate in _ops.attention_decode (the same
        row functions the prefill path calls one by one), then attn_output."""
        cfg = self.cfg
        H, D = cfg.n_head, cfg.head_dim
        full = cfg.flags.qk_norm == "full"
        normed = cfg.flags.qk_norm in ("full", "head")
        cache = self.states[i]
        out = self.work.take("attn", 1, H * D)
        _ops.attention_decode(qkv, H, cfg.n_head_kv, cfg.flags.gated_attention,
                              L.q_norm if normed else None, L.k_norm if normed else None, full,
                              cfg.rms_eps, pos, self.rope.cos, self.rope.sin, cfg.n_rot,
                              cfg.flags.rope == ROPE_NEOX, cache.k, cache.v, self.scale,
                              self.work.take("q", H, D), out.reshape(H, D), self.attn_scores,
                              self.kernel_threads)
        return L.wo(out, self.work.take("attn_proj", 1, cfg.n_embd))

    # ---- linear attention (Gated DeltaNet) ----------------------------------------------------
    def linear_attention(self, i: int, L: GatedDeltaNetWeights, h: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A Gated DeltaNet layer on h: float32[n, n_embd], continuing its recurrent state
        (engine/model/state.py) at positions[0]. The projections, then the causal conv + SiLU, the
        delta rule over every value head and the gated RMSNorm in kernels/_deltanet.pyx (one call
        each, threaded over channels or heads, whatever n), then ssm_out."""
        cfg, d, t = self.cfg, self.cfg.linear, self.kernel_threads
        n = len(h)
        state = self.states[i]
        state.advance(int(positions[0]), n)
        width = d.conv_dim + d.value_dim + 2 * d.n_v_heads
        qkv, z, b, a = L.in_proj(h, self.work.take("linear_in", n, width))  # [n, conv_dim], [n, value_dim], [n, Hv] x2
        mixed = self.work.take("linear_conv", n, d.conv_dim)
        # the kernels take rows that are contiguous within a token, so column slices are passed as views
        _deltanet.conv1d_silu_into(qkv, state.conv, L.conv, mixed, t)
        q = mixed[:, :d.key_dim].reshape(n, d.n_k_heads, d.k_head_dim)
        k = mixed[:, d.key_dim:2 * d.key_dim].reshape(n, d.n_k_heads, d.k_head_dim)
        v = mixed[:, 2 * d.key_dim:].reshape(n, d.n_v_heads, d.v_head_dim)
        beta = sigmoid(b).astype(np.float32)  # [n, Hv]: how much each token rewrites the state
        # log of the per-token decay of each head's state: softplus(alpha + dt_bias) * -exp(A_log)
        decay = (np.logaddexp(np.float32(0), a + L.dt_bias) * L.a).astype(np.float32)  # [n, Hv]
        core = self.work.take("linear_core", n, d.value_dim)
        _deltanet.gated_delta_rule_into(q, k, v, decay, beta, state.ssm, core.reshape(n, d.n_v_heads, d.v_head_dim),
                                        cfg.rms_eps, cfg.flags.linear_v_tiled, t)
        normed = self.work.take("linear_normed", n, d.value_dim)
        rows = n * d.n_v_heads  # the norm is per value head
        _deltanet.gated_rms_norm_into(core.reshape(rows, d.v_head_dim), L.norm,
                                      np.ascontiguousarray(z).reshape(rows, d.v_head_dim), cfg.rms_eps,  # (a copy when n > 1)
                                      normed.reshape(rows, d.v_head_dim), t)
        return L.out(normed, self.work.take("attn_proj", n, cfg.n_embd))

    # ---- feed-forward -------------------------------------------------------------------------
    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up into the workspace's act buffer: float32[n, n_ff]."""
        act = self.work.take("act", *gate.shape)
        _ops.swiglu_into(gate, up, act)
        return act

    def dense_ffn(self, ffn: FFN, h: np.ndarray) -> np.ndarray:
        """Into the workspace's ffn_out buffer: float32[n, n_embd]. A decode step whose gate/up
        (one concatenated matrix) and down have a fused kernel (KernelCache.ffn_kernel) makes one
        call, with the three calls' bits."""
        n, ff = len(h), ffn.down.shape[1]
        gu = self.work.take("gate_up", n, 2 * ff)
        out = self.work.take("ffn_out", n, self.cfg.n_embd)
        fused = self.ffn_kernel(ffn) if n == 1 else None
        if fused is not None:
            w_gu, w_d = ffn.gate_up.parts[0].qt, ffn.down.qt
            fused(h, w_gu.data, int(w_gu.qtype), w_d.data, int(w_d.qtype), gu,
                  self.work.take("act", 1, ff), out, self.kernel_threads)
            return out
        act = self.swiglu(*ffn.gate_up(h, gu))
        return ffn.down(act, out)

    def ffn_kernel(self, ffn: FFN):
        """The fused decode feed-forward kernel for ffn, or None where the three calls are not
        plain kernel products of one gate/up matrix and down (split or mixed-type gate/up, a
        NumPy product, a bias, an observer, no such kernel for the types)."""
        parts = ffn.gate_up.parts
        if len(parts) != 1:
            return None
        gu, down = parts[0], ffn.down
        if any(m.numpy_product or m.bias is not None or m.observe is not None for m in (gu, down)):
            return None
        if gu._kernel is not self.kernel or down._kernel is not self.kernel:
            return None
        return self.kernel.ffn_kernel(gu.qt.qtype, down.qt.qtype)

    def expert_ffn(self, gate, up, down, h: np.ndarray, which: tuple | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """which: (layer, expert) for self.observer. out: float32[n, n_embd] for the result (None:
        a new array, for outputs that must outlive the next expert's)."""
        mm, t = self.kernel.matmul, self.kernel_threads  # the cached kernel choice, as Linear uses
        h = np.ascontiguousarray(h, dtype=np.float32)
        n = len(h)
        gu = self.work.take("gate_up", 2 * n, gate.shape[0])  # gate rows, then up rows
        act = self.swiglu(mm(h, gate, t, gu[:n]), mm(h, up, t, gu[n:]))
        if self.observer is not None and which is not None:
            self.observer.expert(*which, h, act)  # used at once: act is the workspace's
        return mm(act, down, t, out)

    def expert_batch(self, batch, h: np.ndarray, ys: dict, slots: np.ndarray) -> bool:
        """Decode: every expert of `batch` on the one token h in two kernel calls (gate and up of
        all, then down of all) instead of three small calls each; each output row has the bits
        the single calls give. The outputs go to the next len(batch) rows of slots (float32[k,
        n_embd]) after the len(ys) already used. False (nothing done) where the kernel or the
        types do not allow it."""
        gates, ups, downs = zip(*(parts for _, parts in batch))
        tg, td = gates[0].qtype, downs[0].qtype
        many_gu, many_d = self.kernel.many_kernel(tg), self.kernel.many_kernel(td)
        if not (many_gu is not None and many_d is not None
                and all(g.qtype == tg and u.qtype == tg for g, u in zip(gates, ups))
                and all(d.qtype == td for d in downs)):
            return False
        t, ff = len(batch), gates[0].shape[0]
        gu = self.work.take("gate_up", 2 * t, ff)  # gate rows of every expert, then up rows
        rows = self.work.take("experts_in", 2 * t, h.shape[1])  # the token, once per matrix
        rows[:] = h
        many_gu(rows, [g.data for g in gates] + [u.data for u in ups], int(tg), gu, self.kernel_threads)
        act = self.swiglu(gu[:t], gu[t:])  # [t, ff]
        y = slots[len(ys):len(ys) + t]  # [t, n_embd]
        many_d(act, [d.data for d in downs], int(td), y, self.kernel_threads)
        for j, (e, _) in enumerate(batch):
            ys[e] = y[j:j + 1]
        return True

    def experts_prefill(self, batch, h: np.ndarray, groups: "ExpertGroups", y: np.ndarray) -> list:
        """Prefill: the batch's experts, each on the tokens routed to it, in two calls of the
        kernels' matmul_many_into (gate and up of all, then down of all) with a SwiGLU each
        between, instead of three kernel calls each (at 16 threads a 64-token prompt of a
        256-expert model spent more in those calls' set-up than in their rows). Each output
        has expert_ffn's bits: the same kernel module KernelCache picks for its row count, the
        same row kernels, the same SwiGLU. Expert e's outputs go to y[groups.rows(e)] (y:
        float32[n k, n_embd], ExpertGroups' order); returns the batch's experts it left to
        expert_ffn (other types, or a row count the kernel refuses)."""
        calls, rest = {}, []  # (gate/up type, kernel, down type, kernel) -> its experts
        for item in batch:
            e, (gate, up, down) = item
            n = groups.count(e)
            fn_gu, fn_d = self.many_rows_kernel(gate.qtype, n), self.many_rows_kernel(down.qtype, n)
            if up.qtype == gate.qtype and fn_gu is not None and fn_d is not None:
                calls.setdefault((int(gate.qtype), fn_gu, int(down.qtype), fn_d), []).append(item)
            else:
                rest.append(item)
        for (tg, fn_gu, td, fn_d), group in calls.items():
            xs = [h[groups.tokens(e)] for e, _ in group]  # [n_e, n_embd], copies
            ff = group[0][1][0].shape[0]
            gu = [np.empty((2 * len(x), ff), dtype=np.float32) for x in xs]  # gate rows, then up rows
            fn_gu(xs + xs, [p[0].data for _, p in group] + [p[1].data for _, p in group], tg,
                  [b[:len(x)] for b, x in zip(gu, xs)] + [b[len(x):] for b, x in zip(gu, xs)], self.kernel_threads)
            acts = []
            for b, x in zip(gu, xs):
                act = np.empty((len(x), ff), dtype=np.float32)
                _ops.swiglu_into(b[:len(x)], b[len(x):], act)
                acts.append(act)
            fn_d(acts, [p[2].data for _, p in group], td, [y[groups.rows(e)] for e, _ in group], self.kernel_threads)
        return rest

    def many_rows_kernel(self, qtype, n: int):
        """matmul_many_into of the kernel module KernelCache picks for n rows of qtype, where that
        module has it and takes n rows with matmul_into's bits; else None."""
        module = self.kernel(qtype, n)
        fn = getattr(module, "matmul_many_into", None)
        return fn if fn is not None and module.matmul_many_supported(int(qtype), n) else None

    def fused_experts(self, batch, h: np.ndarray, used_weights: np.ndarray, slots: np.ndarray,
                      out: np.ndarray) -> bool:
        """Decode, every routed expert in one batch: gate/up, SwiGLU, down and the weighted sum
        into out (float32[1, n_embd]) in one kernel call (the kernels' moe_decode_into, one
        parallel region, no Python between experts), with the bits expert_batch and moe()'s sum
        give (the experts taken in ascending id, as that sum). used_weights: float32[k], the
        experts' weights in ascending id; slots: float32[k, n_embd] scratch. False (nothing
        done) where the kernel or the types do not allow it."""
        batch = sorted(batch, key=lambda item: item[0])  # the store yields them as they arrive
        gates, ups, downs = zip(*(parts for _, parts in batch))
        tg, td = gates[0].qtype, downs[0].qtype
        fused = self.kernel.moe_kernel(tg, td)
        if fused is None or not all(g.qtype == tg and u.qtype == tg and d.qtype == td
                                    for g, u, d in zip(gates, ups, downs)):
            return False
        fused(h, [g.data for g in gates], [u.data for u in ups], [d.data for d in downs], int(tg), int(td),
              used_weights, slots[:len(batch)], out, self.kernel_threads)
        return True

    def streamed_ffn(self, i: int, h: np.ndarray, ahead: np.ndarray | None = None) -> np.ndarray:
        """A dense FFN read by the store as expert 0 of its layer."""
        for batch in self.experts.fetch(i, [0]):
            if ahead is not None:
                self.prefetcher.on_residual(i, ahead)
            out = self.work.take("ffn_out", len(h), self.cfg.n_embd)  # as dense_ffn's
            return self.expert_ffn(*batch[0][1], h, (i, None), out)

    def route(self, moe: MoEWeights, h: np.ndarray, layer: int | None = None,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts per token: (ids int64[n, k] by descending weight, weights float32[n, k]).
        With self.routing set, the ids are its choices for (layer, each token's position),
        weighted by the router's probabilities at those ids; self.routing_trace records the ids."""
        n, k = len(h), self.cfg.n_expert_used
        probs = self.work.take("router_probs", n, moe.router.shape[0])  # [n, n_expert]
        _ops.softmax_rows_into(moe.router(h, probs), probs)  # in place: one call, no temporaries
        choose = self.routing is None
        ids = np.empty((n, k), dtype=np.int64) if choose else self.chosen_ids(layer, positions, probs)
        weights = np.empty((n, k), dtype=np.float32)
        # the top k (a stable descending argsort's, cut at k) and their weights, in one native call
        _ops.topk_weights_into(probs, ids, weights, self.cfg.flags.moe_norm_topk, choose)
        if self.routing_trace is not None:
            self.routing_trace.record(layer, ids)
        return ids, weights

    def chosen_ids(self, layer: int, positions: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """int64[n, k]: self.routing's experts for each token by descending router probability
        (ties in the source's order), as the router orders its own: replaying the router's
        choices gives the same ids in the same order. probs: float32[n, n_expert]."""
        if layer is None or positions is None:
            raise ValueError("Model.route: a routing source needs the layer and the tokens' positions")
        ids = np.stack([self.routing.choose(layer, int(p)) for p in positions])  # [n, k]
        order = np.argsort(-np.take_along_axis(probs, ids, axis=-1), axis=-1, kind="stable")
        return np.ascontiguousarray(np.take_along_axis(ids, order, axis=-1), dtype=np.int64)

    def moe(self, i: int, moe: MoEWeights, h: np.ndarray, ahead: np.ndarray | None = None,
            positions: np.ndarray | None = None) -> np.ndarray:
        """Routed experts (+ shared expert) on h. ahead: the residual to guess layer i+1's experts
        from, once this layer's reads are queued (the first step of fetch queues them).
        positions: int64[n], the tokens' positions (a routing source chooses by position)."""
        out = self.routed_decode(i, moe, h) if len(h) == 1 else None
        if out is None:
            out = self.routed_experts(i, moe, h, ahead, positions)
        if moe.shared is not None:
            shared = self.dense_ffn(moe.shared, h)
            if moe.shared_gate is not None:
                shared = shared * sigmoid(h @ moe.shared_gate)[:, None]
            out += shared
        return out

    def routed_decode(self, i: int, moe: MoEWeights, h: np.ndarray) -> np.ndarray | None:
        """One token's routed experts held in memory: the router, the top k and every chosen
        expert in one kernel call (moe_route_decode_into: no Python between them), with the bits
        of route() and fused_experts(); the weighted sum in the workspace's moe_out. None
        (nothing done) where that call does not apply (see routed_kernel) or a routing source,
        an observer or a prefetcher is set."""
        if self.routing is not None or self.observer is not None or self.prefetcher is not None:
            return None
        call = self.routed_kernels.get(i, False)
        if call is False:
            call = self.routed_kernels[i] = self.routed_kernel(moe)
        if call is None:
            return None
        kernel, qtype_gu, qtype_d = call
        cfg, k = self.cfg, self.cfg.n_expert_used
        probs = self.work.take("router_probs", 1, moe.router.shape[0])  # [1, n_expert]
        out = self.work.take("moe_out", 1, cfg.n_embd)
        kernel(h, moe.router.dense, *moe.stacked, qtype_gu, qtype_d, cfg.flags.moe_norm_topk, probs,
               self.route_ids, self.route_weights, self.work.take("experts_out", k, cfg.n_embd), out,
               self.kernel_threads)
        if self.routing_trace is not None:
            self.routing_trace.record(i, self.route_ids)  # (it copies)
        return out

    def routed_kernel(self, moe: MoEWeights):
        """(moe_route_decode_into, gate/up type, down type) for a layer whose experts this model
        holds in memory, or None where that call would not give route() + fused_experts()'s bits:
        experts from a store, a router that is not F32 through _legacy's float kernel (whose row
        dot the call shares), expert types the fused kernel lacks, a kernel module without it."""
        router = moe.router
        if type(self.experts) is not ResidentExperts or moe.stacked is None or router.qt.qtype != F32 \
                or router.numpy_product or router.bias is not None or router.observe is not None \
                or getattr(self.kernel(F32, 1), "__name__", "") != "weightstream.kernels._legacy":
            return None
        tg, tu, td = moe.gate_exps[0].qtype, moe.up_exps[0].qtype, moe.down_exps[0].qtype
        module = self.kernel(tg, 1)
        kernel = getattr(module, "moe_route_decode_into", None)
        if tu != tg or kernel is None or self.kernel.moe_kernel(tg, td) is not getattr(module, "moe_decode_into", None):
            return None
        return kernel, int(tg), int(td)

    def routed_experts(self, i: int, moe: MoEWeights, h: np.ndarray, ahead: np.ndarray | None,
                       positions: np.ndarray | None) -> np.ndarray:
        """The routed experts' weighted sum on h (moe's path through route(), the expert source and
        the per-batch kernels), in the workspace's moe_out."""
        ids, weights = self.route(moe, h, i, positions)
        if len(h) > 1:
            return self.routed_prefill(i, h, ids, weights, ahead)
        # decode: every expert sees the one token; the token's experts in ascending id (the
        # summing order) and their weights
        order = np.argsort(ids[0])
        used, used_weights = ids[0][order], weights[0][order]
        ys = {}  # expert -> its output row, a view of its slot (slots fill in arrival order)
        slots = self.work.take("experts_out", len(used), self.cfg.n_embd)  # one row each, in arrival order
        out = self.work.take("moe_out", *h.shape)
        summed = False  # out already holds the weighted sum (the fused call made it)
        for batch in self.experts.fetch(i, used):  # (run to its end: the store's bookkeeping)
            if ahead is not None:
                self.prefetcher.on_residual(i, ahead)
                ahead = None
            if len(batch) == len(used) and self.observer is None and self.fused_experts(
                    batch, h, used_weights, slots, out):
                summed = True
                continue
            if len(batch) > 1 and self.observer is None and self.expert_batch(batch, h, ys, slots):
                continue
            for e, parts in batch:
                ys[e] = self.expert_ffn(*parts, h, (i, e), slots[len(ys):len(ys) + 1])
        if not summed:  # each expert's slot (filled in arrival order), summed in ascending id
            slot = {e: j for j, e in enumerate(ys)}
            rows = np.array([[slot[e] for e in used.tolist()]], dtype=np.int64)  # [1, k]
            _ops.moe_combine_into(slots[:len(ys)], rows, used_weights[None], out, self.kernel_threads)
        return out

    def routed_prefill(self, i: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                       ahead: np.ndarray | None) -> np.ndarray:
        """The routed experts of a prompt batch h: float32[n, n_embd] (ids, weights: [n, k] from
        route()): each expert on its tokens' rows, the outputs in one array grouped by expert
        (ExpertGroups), then each token's k outputs weighted and summed in ascending expert id
        in one native call (fixed order: arrival order must not change the bits)."""
        groups = ExpertGroups(ids)
        y = np.empty((ids.size, self.cfg.n_embd), dtype=np.float32)  # work_buffers' experts_rows
        for batch in self.experts.fetch(i, groups.used):
            if ahead is not None:
                self.prefetcher.on_residual(i, ahead)
                ahead = None
            if self.observer is None:
                batch = self.experts_prefill(batch, h, groups, y)  # what it leaves goes one by one
            for e, parts in batch:
                self.expert_ffn(*parts, h[groups.tokens(e)], (i, e), y[groups.rows(e)])
        out = self.work.take("moe_out", *h.shape)
        rows, w = groups.by_expert_id(weights)
        _ops.moe_combine_into(y, rows, w, out, self.kernel_threads)
        return out


class ExpertGroups:
    """A prompt batch's (token, slot) pairs grouped by expert: from ids int64[n, k] (route()'s),
    pair (t, j) at row rows_of[t, j] of a [n k, ...] array, expert e's rows contiguous
    (rows(e)) and its tokens ascending (tokens(e)): one stable argsort instead of a scan of ids
    per expert (256 a layer)."""

    def __init__(self, ids: np.ndarray):
        n, k = ids.shape
        flat = ids.ravel()
        order = np.argsort(flat, kind="stable")  # the pairs by expert, tokens ascending within one
        self.ids = ids
        self.token_of = order // k  # int64[n k]: the token of each row
        self.used, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        self.span = {e: (s, s + c) for e, s, c in zip(self.used.tolist(), starts.tolist(), counts.tolist())}
        rows_of = np.empty(n * k, dtype=np.int64)
        rows_of[order] = np.arange(n * k)
        self.rows_of = rows_of.reshape(n, k)

    def rows(self, e: int) -> slice:
        start, end = self.span[e]
        return slice(start, end)

    def count(self, e: int) -> int:
        start, end = self.span[e]
        return end - start

    def tokens(self, e: int) -> np.ndarray:
        return self.token_of[self.rows(e)]

    def by_expert_id(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64[n, k], weights float32[n, k]) with each token's slots in ascending expert id."""
        order = np.argsort(self.ids, axis=1, kind="stable")
        return (np.ascontiguousarray(np.take_along_axis(self.rows_of, order, axis=1)),
                np.ascontiguousarray(np.take_along_axis(weights, order, axis=1), dtype=np.float32))


def nonfinite_error(at: tuple[int, int] | None, logits: np.ndarray, positions: np.ndarray) -> Exception:
    """The NonFiniteError for non-finite logits: at = (layer, token position) where the residual
    first went NaN / Inf (Model.run_layers), None when every layer's output stayed finite (then the
    head made them: output_norm / output.weight). logits: float32[1 or n, n_vocab], the last
    position's row only when it has one row."""
    from ..errors import NonFiniteError  # here, not at the top: the failure path only
    if at is not None:
        layer, pos = at
        return NonFiniteError(
            f"forward: the logits are NaN/Inf; the first layer whose output (the residual) went "
            f"NaN/Inf is layer {layer} (tensors blk.{layer}.*), at token position {pos}: a NaN or Inf "
            f"in its weights (e.g. a block scale) or a value that overflowed float32 there; expected "
            f"finite values, no token was sampled")
    row = _ops.first_nonfinite_row(logits)
    pos = int(positions[-1] if len(logits) == 1 else positions[row])
    return NonFiniteError(
        f"forward: the logits are NaN/Inf at token position {pos} although every layer's output was "
        f"finite: the output head (output_norm.weight, output.weight or the tied token_embd.weight) "
        f"holds a NaN or Inf; expected finite values, no token was sampled")
