"""A decode step's layers in one native call (kernels/_decode_layers.pxi, decode_layers_into).

Model.run_layers' per-layer path makes ~45 Python calls a layer around its kernels; on a 48-layer
MoE that was ~3.5 ms of a ~55 ms step on 2 threads, while the second thread waited. Where every
layer held is an attention layer with routed experts held in memory, through the k-quant kernel
module (_kquants: QKV, output projection and experts) and the F32 router that
moe_route_decode_into takes, DecodePlan describes them once as two tables (the addresses and
the integers of each layer) and a step is one call with the same kernels in the same order: the
per-layer path's bits (tests/test_decode_layers.py).

Anything else (a bias, a shared expert, linear-attention or dense layers, another kernel module,
experts from a store) and build() returns None: the model keeps the per-layer path.
"""
from __future__ import annotations

import numpy as np

from .config import ROPE_NEOX
from .experts import ResidentExperts


def _kquants():
    try:
        from ...kernels import _kquants
    except ImportError:  # an unbuilt checkout: no native path
        return None
    return _kquants


def _addr(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data


def _plain(lin, module, kernel, cols: int) -> bool:
    """Whether Linear `lin` is a k-quant matrix of `cols` columns that the model multiplies
    through `module`'s matmul_into at one row, with nothing around the product."""
    return (lin is not None and lin.bias is None and lin.observe is None and lin.dense is None
            and not lin.numpy_product and int(lin.qt.qtype) in module.SUPPORTED
            and kernel(lin.qt.qtype, 1) is module and lin.shape[1] == cols
            and lin.qt.data.flags.c_contiguous)


def _float_vector(a, n: int) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (n,) and a.flags.c_contiguous


class DecodePlan:
    """The tables of Model `model`'s layers for decode_layers_into (see build)."""

    def __init__(self, model, module, ptrs: np.ndarray, ints: np.ndarray, keep: list):
        self.model, self.module = model, module
        self.ptrs, self.ints = ptrs, ints  # uint64 / int64[layers, len(DECODE_PTRS / DECODE_INTS)]
        self.keep = keep  # the arrays whose addresses the tables hold (alive as long as the plan)

    @classmethod
    def build(cls, model) -> DecodePlan | None:
        """The plan, or None where a layer of `model` is not one decode_layers_into runs."""
        module = _kquants()
        if module is None or not hasattr(module, "decode_layers_into"):
            return None
        cfg, kernel = model.cfg, model.kernel
        E, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
        if type(model.experts) is not ResidentExperts or cfg.n_expert_used < 1 or E % 256:
            return None
        if not (model.rope.cos.flags.c_contiguous and model.rope.sin.flags.c_contiguous):
            return None
        normed = cfg.flags.qk_norm in ("full", "head")
        full = cfg.flags.qk_norm == "full"
        pcol = {name: j for j, name in enumerate(module.DECODE_PTRS)}
        icol = {name: j for j, name in enumerate(module.DECODE_INTS)}
        layers = list(model.layer_range)
        ptrs = np.zeros((len(layers), len(pcol)), dtype=np.uint64)
        ints = np.zeros((len(layers), len(icol)), dtype=np.int64)
        keep = []
        for r, i in enumerate(layers):
            L = model.w.layers[i]
            moe = L.moe if L is not None else None
            if moe is None or L.linear is not None or L.wqkv is None or moe.shared is not None \
                    or moe.shared_gate is not None or model.routed_kernel(moe) is None:
                return None
            tg, td = moe.gate_exps[0].qtype, moe.down_exps[0].qtype
            if kernel(tg, 1) is not module or kernel(td, 1) is not module:
                return None
            ff = moe.gate_exps[0].shape[0]
            gu_bytes = ff * (E // 256) * module.BLOCK_BYTES[int(tg)]
            d_bytes = E * (ff // 256) * module.BLOCK_BYTES[int(td)] if ff % 256 == 0 else -1
            if moe.stacked[0].shape[1] != gu_bytes or moe.stacked[1].shape[1] != gu_bytes \
                    or moe.stacked[2].shape[1] != d_bytes:
                return None
            parts = L.wqkv.parts
            if not 1 <= len(parts) <= 3 or not all(_plain(p, module, kernel, E) for p in parts) \
                    or not _plain(L.wo, module, kernel, H * D):
                return None
            if not (_float_vector(L.attn_norm, E) and _float_vector(L.ffn_norm, E)):
                return None
            q_norm, k_norm = (L.q_norm, L.k_norm) if normed else (None, None)
            nq, nk = (H * D, Hkv * D) if full else (D, D)
            if normed and not (_float_vector(q_norm, nq) and _float_vector(k_norm, nk)):
                return None
            router, stacked = moe.router.dense, moe.stacked
            if not (router.flags.c_contiguous and all(s.flags.c_contiguous for s in stacked)):
                return None
            cache = model.states[i]
            row = {"attn_norm": L.attn_norm, "wo": L.wo.qt.data, "q_norm": q_norm, "k_norm": k_norm,
                   "k_cache": cache.k, "v_cache": cache.v, "ffn_norm": L.ffn_norm, "router": router,
                   "gates": stacked[0], "ups": stacked[1], "downs": stacked[2]}
            for j, p in enumerate(parts):
                row[f"qkv{j}"] = p.qt.data
                ints[r, icol[f"qkv_type{j}"]] = int(p.qt.qtype)
                ints[r, icol[f"qkv_rows{j}"]] = p.shape[0]
            for name, a in row.items():
                ptrs[r, pcol[name]] = _addr(a)
                keep.append(a)
            ints[r, icol["parts"]] = len(parts)
            ints[r, icol["wo_type"]] = int(L.wo.qt.qtype)
            ints[r, icol["gu_type"]], ints[r, icol["d_type"]] = int(tg), int(td)
            ints[r, icol["n_expert"]] = router.shape[0]
            ints[r, icol["ff"]] = ff
        return cls(model, module, ptrs, ints, keep)

    def run(self, x: np.ndarray, pos: int) -> int:
        """The layers on the residual x: float32[1, n_embd] (in place) for the token at pos; the
        table row of the first layer after which x held a NaN / Inf, or -1."""
        m = self.model
        cfg = m.cfg
        return self.module.decode_layers_into(
            x, self.ptrs, self.ints, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.flags.gated_attention,
            cfg.flags.qk_norm == "full", cfg.rms_eps, pos, m.rope.cos, m.rope.sin, cfg.n_rot,
            cfg.flags.rope == ROPE_NEOX, m.scale, m.n_ctx, cfg.n_expert_used, cfg.flags.moe_norm_topk,
            m.attn_scores, m.kernel_threads)
