"""weightstream.kernels._ops (the per-token small operations) against the NumPy versions in kernels/reference/ops.py.

They accumulate in double where NumPy sums float32 pairwise, so they agree to float32 rounding:
max |difference| below REL of the output's largest magnitude."""
import numpy as np
import pytest

from weightstream.kernels.reference.ops import ROPE_NEOX, ROPE_NORM
from weightstream.kernels.reference.ops import Rope, rms_norm, silu, softmax
from weightstream.kernels import _ops

REL = 2e-6


def close(got, ref, rel=REL):
    return np.abs(got - ref).max() <= rel * np.abs(ref).max()


@pytest.mark.parametrize("n,e", [(1, 576), (7, 64), (3, 4096)])
def test_rms_norm(n, e):
    rng = np.random.default_rng([n, e])
    x = rng.standard_normal((n, e), dtype=np.float32) * 3
    w = rng.standard_normal(e, dtype=np.float32)
    out = np.empty_like(x)
    _ops.rms_norm_into(x, w, 1e-5, out)
    assert close(out, rms_norm(x, w, 1e-5))
    _ops.rms_norm_into(x, w, 1e-5, x)  # in place
    assert np.array_equal(x, out)


@pytest.mark.parametrize("style", [ROPE_NORM, ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope(style, n_rot):
    rope = Rope(n_rot, 10000.0, 512, style)
    rng = np.random.default_rng(n_rot)
    x = rng.standard_normal((5, 9, 64), dtype=np.float32)
    positions = np.array([0, 1, 100, 511, 3])
    ref = rope(x, positions)
    _ops.rope_inplace(x, positions, rope.cos, rope.sin, n_rot, style == ROPE_NEOX)
    assert close(x, ref)


def test_swiglu_on_strided_halves():
    rng = np.random.default_rng(0)
    both = rng.standard_normal((3, 2 * 1536), dtype=np.float32) * 4
    gate, up = both[:, :1536], both[:, 1536:]  # views with a row stride of 2 * 1536
    out = np.empty((3, 1536), np.float32)
    _ops.swiglu_into(gate, up, out)
    assert close(out, silu(gate) * up)


@pytest.mark.parametrize("heads,kv_heads,n_kv,threads", [(9, 3, 1, 1), (9, 3, 37, 2), (32, 8, 500, 2), (4, 4, 200, 1)])
def test_attend_one(heads, kv_heads, n_kv, threads):
    hd, n_ctx = 64, 512
    rng = np.random.default_rng([heads, n_kv])
    q = rng.standard_normal((heads, hd), dtype=np.float32)
    k_cache = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    v_cache = rng.standard_normal((n_ctx, kv_heads, hd), dtype=np.float32)
    scale = np.float32(hd ** -0.5)
    out = np.empty((heads, hd), np.float32)
    _ops.attend_one(q, k_cache, v_cache, n_kv, scale, out, np.empty((heads, n_ctx), np.float32), threads)
    g = heads // kv_heads
    keys = np.repeat(k_cache[:n_kv], g, axis=1).transpose(1, 0, 2)  # [heads, n_kv, hd]
    values = np.repeat(v_cache[:n_kv], g, axis=1).transpose(1, 0, 2)
    probs = softmax(np.einsum("hd,htd->ht", q, keys) * scale)
    assert close(out, np.einsum("ht,htd->hd", probs, values), 1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="rms_norm_into: weight has 3 values"):
        _ops.rms_norm_into(np.zeros((1, 4), np.float32), np.zeros(3, np.float32), 1e-5, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="position 600 outside"):
        rope = Rope(8, 10000.0, 512, ROPE_NEOX)
        _ops.rope_inplace(np.zeros((1, 1, 8), np.float32), np.array([600]), rope.cos, rope.sin, 8, True)
    with pytest.raises(ValueError, match="n_kv 513 for a cache of 512"):
        _ops.attend_one(np.zeros((2, 8), np.float32), np.zeros((512, 1, 8), np.float32), np.zeros((512, 1, 8), np.float32),
                        513, 1.0, np.zeros((2, 8), np.float32), np.zeros((2, 513), np.float32))
