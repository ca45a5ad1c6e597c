"""NumPy versions of the Gated DeltaNet layer's operations (Qwen3.5 / Qwen3-Next linear attention):
the reference that kernels/_deltanet.pyx is tested against (tests/test_deltanet.py).

    conv1d_silu(x, conv_state, weight)              depthwise causal conv over time, then SiLU
    gated_delta_rule(q, k, v, g, beta, state, ...)   the recurrence, one token at a time
    chunk_gated_delta_rule(...)                      the same function, 64 tokens at a time (WY / UT form)
    gated_rms_norm(x, weight, z, eps)                RMSNorm of each head's output, gated by silu(z)

Shapes (n tokens; Hk key/query heads of Dk; Hv value heads of Dv; Hv % Hk == 0, r = Hv // Hk):
q, k float32[n, Hk, Dk]; v float32[n, Hv, Dv]; g, beta float32[n, Hv]; state float32[Hv, Dk, Dv].

Per token t and value head h, with kh its key head (below), the recurrence is

    qn = q[t, kh] / sqrt(|q[t, kh]|^2 + eps) / sqrt(Dk)      kn = k[t, kh] / sqrt(|k[t, kh]|^2 + eps)
    S  = exp(g[t, h]) * S                                    (g <= 0: a decay in log space)
    delta = beta[t, h] * (v[t, h] - S^T kn)                  (the delta rule: write only the error)
    S  = S + outer(kn, delta)
    out[t, h] = S^T qn

kh = h % Hk when `tiled` (llama.cpp's order of the value heads in qwen35 / qwen35moe GGUF files)
and h // r otherwise (qwen3next GGUF files, and Hugging Face's repeat_interleave). The state is
updated in place, so a sequence run in pieces, state carried, equals the sequence run at once.
Everything is float32; clarity first.
"""
from __future__ import annotations

import numpy as np

from .ops import rms_norm, silu


def conv1d_silu(x: np.ndarray, conv_state: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """silu(depthwise causal conv1d) of n new time steps; no bias.

    x: float32[n, C] (n steps of C channels); conv_state: float32[K-1, C], the K-1 inputs before
    x, oldest first (zeros at the start of a sequence), replaced IN PLACE by the last K-1 rows of
    xx = concat(conv_state, x); weight: float32[C, K] (GGUF's ssm_conv1d), weight[c, K-1] taking
    the newest step. Returns out float32[n, C]: out[t, c] = silu(sum_j weight[c, j] * xx[t + j, c]).
    """
    n, C = x.shape
    K = weight.shape[1]
    assert weight.shape == (C, K) and conv_state.shape == (K - 1, C), "conv1d_silu: shapes"
    xx = np.concatenate([conv_state, x], axis=0)  # [K-1+n, C]
    acc = np.zeros((n, C), np.float32)
    for j in range(K):
        acc += weight[:, j] * xx[j:j + n]
    if K > 1:
        conv_state[...] = xx[n:]  # the last K-1 rows
    return silu(acc)


def gated_rms_norm(x: np.ndarray, weight: np.ndarray, z: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight * silu(z), per row: x, z float32[m, D], weight float32[D]
    (norm before gate, as Qwen3.5's RMSNormGated and llama.cpp's ssm_norm)."""
    return rms_norm(x, weight, eps) * silu(z)


def key_heads(hv: int, hk: int, tiled: bool) -> np.ndarray:
    """int[Hv]: the key head of each value head (h % Hk tiled, h // (Hv / Hk) otherwise)."""
    if hk <= 0 or hv % hk:
        raise ValueError(f"{hv} value heads cannot share {hk} key heads")
    h = np.arange(hv)
    return h % hk if tiled else h // (hv // hk)


def normalized_qk(q: np.ndarray, k: np.ndarray, hv: int, eps: float, tiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(qn, kn) float32[n, Hv, Dk]: q and k L2-normalised (FLA's x / sqrt(sum x^2 + eps)), q also
    scaled by 1/sqrt(Dk), and each expanded to the value heads' order."""
    idx = key_heads(hv, q.shape[1], tiled)
    eps = np.float32(eps)
    qn = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + eps) / np.float32(np.sqrt(q.shape[-1]))
    kn = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + eps)
    return qn[:, idx].astype(np.float32), kn[:, idx].astype(np.float32)


def _check(q, k, v, g, beta, state):
    n, hk, dk = q.shape
    hv, dv = v.shape[1:]
    assert k.shape == q.shape and v.shape[0] == n and g.shape == beta.shape == (n, hv), "gated delta rule: shapes"
    assert state.shape == (hv, dk, dv), "gated delta rule: state shape"
    return n, hk, dk, hv, dv


def gated_delta_rule(q, k, v, g, beta, state, eps: float = 1e-6, tiled: bool = True) -> np.ndarray:
    """The recurrence of the module docstring, one token at a time: out float32[n, Hv, Dv];
    state float32[Hv, Dk, Dv] updated IN PLACE."""
    n, _, _, hv, dv = _check(q, k, v, g, beta, state)
    qn, kn = normalized_qk(q, k, hv, eps, tiled)
    S = state.astype(np.float32)  # [Hv, Dk, Dv], a working copy
    out = np.empty((n, hv, dv), np.float32)
    for t in range(n):
        S *= np.exp(g[t])[:, None, None]
        kv = np.einsum("hkv,hk->hv", S, kn[t])  # what the decayed state already predicts for kn
        delta = (v[t] - kv) * beta[t][:, None]  # [Hv, Dv]
        S += kn[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", S, qn[t])
    state[...] = S
    return out


def chunk_gated_delta_rule(q, k, v, g, beta, state, eps: float = 1e-6, tiled: bool = True,
                           chunk: int = 64) -> np.ndarray:
    """gated_delta_rule computed `chunk` tokens at a time (the WY / UT-transform form of
    transformers' torch_chunk_gated_delta_rule, written afresh): the same out and final state.

    Within a chunk, with S0 the state before it and gam[t] = g[0] + ... + g[t] (cumulative log
    decay from the chunk's start), unrolling the recurrence gives

        S_t   = e^gam[t] S0 + sum_{j<=t} e^(gam[t]-gam[j]) kn_j delta_j^T
        delta = (I + A)^-1 (beta v) - (I + A)^-1 (beta e^gam kn) S0 = U - W S0
                with A[t, j] = beta_t e^(gam[t]-gam[j]) kn_t . kn_j for j < t (strictly lower)
        out_t = e^gam[t] S0^T qn_t + sum_{j<=t} e^(gam[t]-gam[j]) (qn_t . kn_j) delta_j
        S_end = e^gam[-1] S0 + sum_j e^(gam[-1]-gam[j]) kn_j delta_j^T

    so everything but the (chunk x chunk) triangular solves is matrix products, and only the
    short loop over chunks is sequential. The last chunk is padded with g = beta = k = v = 0:
    those steps neither decay nor write the state.
    """
    n, _, _, hv, dv = _check(q, k, v, g, beta, state)
    qn, kn = normalized_qk(q, k, hv, eps, tiled)
    pad = (-n) % chunk
    nc = (n + pad) // chunk

    def by_chunk(a):
        """[n, Hv, ...] -> [Hv, nc, chunk, ...], zero-padded at the end."""
        a = np.moveaxis(a, 1, 0)
        a = np.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return np.ascontiguousarray(a.reshape((hv, nc, chunk) + a.shape[2:]), dtype=np.float32)

    Q, K, V, G, B = (by_chunk(a) for a in (qn, kn, v, g, beta))  # Q, K [Hv, nc, C, Dk]; V [.., Dv]; G, B [Hv, nc, C]
    gam = np.cumsum(G, axis=-1)  # [Hv, nc, C]
    diff = gam[..., :, None] - gam[..., None, :]  # [Hv, nc, C, C]: gam[t] - gam[j]
    strict = np.tril(np.ones((chunk, chunk), bool), -1)  # j < t
    causal = np.tril(np.ones((chunk, chunk), bool))  # j <= t
    # exp only where j <= t: above the diagonal diff > 0 and could overflow
    decay = np.exp(np.where(causal, diff, np.float32(-np.inf)))  # [Hv, nc, C, C]

    A = (B[..., :, None] * (K @ np.swapaxes(K, -1, -2))) * decay * strict
    T = A + np.eye(chunk, dtype=np.float32)  # unit lower triangular
    U = np.linalg.solve(T, B[..., None] * V)  # [Hv, nc, C, Dv]
    W = np.linalg.solve(T, (B * np.exp(gam))[..., None] * K)  # [Hv, nc, C, Dk]
    QK = (Q @ np.swapaxes(K, -1, -2)) * decay  # [Hv, nc, C, C]: intra-chunk attention, causal
    Qg = Q * np.exp(gam)[..., None]  # reads the state as it was at the chunk's start
    Kg = K * np.exp(gam[..., -1:] - gam)[..., None]  # each write, decayed to the chunk's end
    last = np.exp(gam[..., -1])  # [Hv, nc]

    S = state.astype(np.float32)  # [Hv, Dk, Dv]
    out = np.empty((hv, nc, chunk, dv), np.float32)
    for c in range(nc):
        delta = U[:, c] - W[:, c] @ S  # [Hv, C, Dv]
        out[:, c] = Qg[:, c] @ S + QK[:, c] @ delta
        S = last[:, c, None, None] * S + np.swapaxes(Kg[:, c], -1, -2) @ delta
    state[...] = S
    return np.ascontiguousarray(out.reshape(hv, nc * chunk, dv)[:, :n].transpose(1, 0, 2))
