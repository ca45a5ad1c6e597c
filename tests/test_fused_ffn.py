"""The fused decode-step feed-forward (ffn_decode_into of kernels/_legacy.pyx and _kquants.pyx;
engine/model/forward.py dense_ffn): gate/up, SwiGLU and down of one token in one native call, one
parallel region. It runs the three calls' arithmetic (matmul_into's activation quantization, row
chunks and kernels, _ops.swiglu_into's row function), so the tests ask for the same bits, from
the kernel to the logits of a real model."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from tests.test_fused_moe import decode_logits
from weightstream.engine.tools.synth import Preset, synth_model
from weightstream.kernels import QTensor, _kquants, _legacy, _ops, dequantize
from weightstream.kernels.backends import KernelCache
from weightstream.kernels.quantize_weights import quantize

pytestmark = pytest.mark.skipif(not _legacy.ffn_decode_supported(int(T.Q4_0), int(T.Q4_0)),
                                reason="no decode kernels built (portable build)")


def ffn_weights(tg, td, E, ff, rng):
    """(w_gu: the ff gate rows then the ff up rows, w_down) as quantized block rows."""
    def q(rows, cols, qt):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qt)
    return np.concatenate([q(ff, E, tg), q(ff, E, tg)]), q(E, ff, td)


def three_calls(h, w_gu, tg, w_d, td, ff, threads, module=_legacy):
    """What dense_ffn does without the fused kernel: matmul, SwiGLU, matmul."""
    gu = np.empty((1, 2 * ff), np.float32)
    module.matmul_into(h, w_gu, int(tg), gu, threads)
    act = np.empty((1, ff), np.float32)
    _ops.swiglu_into(gu[:, :ff], gu[:, ff:], act)
    out = np.empty((1, h.shape[1]), np.float32)
    module.matmul_into(act, w_d, int(td), out, threads)
    return gu, act, out


def fused(h, w_gu, tg, w_d, td, ff, threads, module=_legacy):
    gu, act, out = np.empty((1, 2 * ff), np.float32), np.empty((1, ff), np.float32), np.empty_like(h)
    module.ffn_decode_into(h, w_gu, int(tg), w_d, int(td), gu, act, out, threads)
    return gu, act, out


# legacy E, ff: SmolLM2's widths (an even number of blocks a row: the decode stream), odd block
# counts (the row-by-row decode), one block; k-quants: multiples of 256
CASES = ([(_legacy, E, ff, tg, td) for E, ff in [(576, 1536), (96, 160), (64, 32)]
          for tg, td in [(T.Q4_1, T.Q4_1), (T.Q4_0, T.Q8_0), (T.Q5_0, T.Q5_1), (T.Q8_0, T.Q4_0)]]
         + [(_kquants, E, ff, tg, td) for E, ff in [(512, 768), (256, 256)]
            for tg, td in [(T.Q4_K, T.Q6_K), (T.Q2_K, T.Q3_K), (T.Q5_K, T.Q4_K)]])


@pytest.mark.parametrize("module,E,ff,tg,td", CASES,
                         ids=lambda v: v.__name__.rsplit(".", 1)[-1] if hasattr(v, "__name__") else str(v))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_call_gives_the_three_calls_bits(module, E, ff, tg, td, threads):
    rng = np.random.default_rng([E, ff, int(tg), int(td)])
    w_gu, w_d = ffn_weights(tg, td, E, ff, rng)
    h = rng.standard_normal((1, E)).astype(np.float32)
    got = fused(h, w_gu, tg, w_d, td, ff, threads, module)
    want = three_calls(h, w_gu, tg, w_d, td, ff, threads, module)
    for name, a, b in zip(("gate/up", "SwiGLU", "out"), got, want):
        assert np.array_equal(a, b), name
    # and it is the feed-forward: the float reference on the dequantized weights, to the
    # rounding of the int8 activations
    wg = quantize_ref(w_gu, tg, 2 * ff, E)
    wd = quantize_ref(w_d, td, E, ff)
    g, u = (h @ wg.T)[:, :ff], (h @ wg.T)[:, ff:]
    ref = (g / (1 + np.exp(-g)) * u) @ wd.T
    assert np.sum((got[2] - ref) ** 2) / np.sum(ref ** 2) < 1e-3


def quantize_ref(raw, qt, rows, cols):
    """The float32 weights the quantized rows stand for."""
    return dequantize(QTensor(qt, (rows, cols), raw), 1)


@pytest.mark.parametrize("module,qt,E,ff", [(_legacy, T.Q4_1, 576, 1536), (_kquants, T.Q4_K, 512, 768)],
                         ids=["legacy", "kquants"])
def test_a_non_finite_activation_gives_nan_outputs(module, qt, E, ff):
    rng = np.random.default_rng(5)
    w_gu, w_d = ffn_weights(qt, qt, E, ff, rng)
    h = rng.standard_normal((1, E)).astype(np.float32)
    h[0, 7] = np.nan
    gu, act, out = fused(h, w_gu, qt, w_d, qt, ff, 2, module)
    assert np.isnan(gu).all() and np.isnan(out).all()
    assert np.array_equal(out, three_calls(h, w_gu, qt, w_d, qt, ff, 2, module)[2], equal_nan=True)


def test_bad_arguments_are_named():
    rng = np.random.default_rng(6)
    E, ff = 64, 96
    w_gu, w_d = ffn_weights(T.Q4_0, T.Q4_0, E, ff, rng)
    h = np.ones((1, E), np.float32)
    gu, act, out = np.empty((1, 2 * ff), np.float32), np.empty((1, ff), np.float32), np.empty((1, E), np.float32)
    assert not _legacy.ffn_decode_supported(int(T.F32), int(T.Q4_0))
    assert not _legacy.ffn_decode_supported(int(T.Q4_0), int(T.Q4_K))
    with pytest.raises(ValueError, match="not both 32-element quantized"):
        _legacy.ffn_decode_into(h, w_gu, int(T.F16), w_d, int(T.Q4_0), gu, act, out, 1)
    with pytest.raises(ValueError, match="do not fit one token's feed-forward"):
        _legacy.ffn_decode_into(h, w_gu[:ff], int(T.Q4_0), w_d, int(T.Q4_0), gu, act, out, 1)
    with pytest.raises(ValueError, match="do not fit one token's feed-forward"):
        _legacy.ffn_decode_into(np.ones((2, E), np.float32), w_gu, int(T.Q4_0), w_d, int(T.Q4_0), gu, act, out, 1)
    with pytest.raises(ValueError, match="do not fit one token's feed-forward"):   # down read as gate/up's type
        _legacy.ffn_decode_into(h, w_gu, int(T.Q4_0), w_d, int(T.Q8_0), gu, act, out, 1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _legacy.ffn_decode_into(h, w_gu, int(T.Q4_0), w_d, int(T.Q4_0), gu, act, out, 0)
    # the k-quant one: moe_decode_into's checks, and the matrices' shapes
    E, ff = 256, 256
    w_gu, w_d = ffn_weights(T.Q4_K, T.Q4_K, E, ff, rng)
    h, out = np.ones((1, E), np.float32), np.empty((1, E), np.float32)
    gu, act = np.empty((1, 2 * ff), np.float32), np.empty((1, ff), np.float32)
    with pytest.raises(ValueError, match="not supported"):
        _kquants.ffn_decode_into(h, w_gu, int(T.Q4_0), w_d, int(T.Q4_K), gu, act, out, 1)
    with pytest.raises(ValueError, match="expected"):
        _kquants.ffn_decode_into(h, w_gu[:ff], int(T.Q4_K), w_d, int(T.Q4_K), gu, act, out, 1)


def count_calls(monkeypatch, module, name: str) -> list:
    """module.name wrapped to append to the returned list at each call."""
    calls, real = [], getattr(module, name)

    def counting(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(module, name, counting)
    return calls


def test_the_model_takes_the_fused_call_and_keeps_the_bits(demo_model, monkeypatch):
    """SmolLM2-135M Q4_1 (30 layers): every decode step's every layer makes the one call;
    without it (KernelCache.ffn_kernel None) the three calls; the logits are the same bits."""
    calls = count_calls(monkeypatch, _legacy, "ffn_decode_into")
    one_call = decode_logits(demo_model, 4)
    assert len(calls) == 4 * 30
    monkeypatch.setattr(KernelCache, "ffn_kernel", lambda self, tg, td: None)
    assert np.array_equal(one_call, decode_logits(demo_model, 4))
    assert len(calls) == 4 * 30

SHARED_MOE = Preset("test-ffn-shexp", "qwen2moe", "Qwen2MoeForCausalLM", n_layer=2, n_embd=512, n_head=4,
                    n_head_kv=2, head_dim=128, n_expert=8, n_expert_used=2, n_ff_exp=256, n_vocab=49152,
                    n_ff=1024, rope_base=1e6, rms_eps=1e-6, n_ctx=512, norm_topk=False, n_ff_shexp=512)


@pytest.fixture(scope="module")
def shared_moe(tmp_path_factory, demo_model):  # demo_model: synth borrows its tokenizer
    return synth_model(tmp_path_factory.mktemp("ffn") / "shexp.gguf", SHARED_MOE, progress=False)


def test_a_k_quant_shared_expert_takes_the_fused_call_and_keeps_the_bits(shared_moe, monkeypatch):
    """A k-quant MoE file's shared expert (dense_ffn on every layer) makes _kquants' one call at
    every decode step; the logits equal the three calls'."""
    calls = count_calls(monkeypatch, _kquants, "ffn_decode_into")
    one_call = decode_logits(shared_moe, 4)
    assert len(calls) == 4 * SHARED_MOE.n_layer
    monkeypatch.setattr(KernelCache, "ffn_kernel", lambda self, tg, td: None)
    assert np.array_equal(one_call, decode_logits(shared_moe, 4))
    assert len(calls) == 4 * SHARED_MOE.n_layer
