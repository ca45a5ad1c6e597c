"""Activation quantizers against a direct transcription of llama.cpp's reference loops."""
import numpy as np
import pytest

from weightstream.kernels import quantize


def q8_k_loop(row):
    """ggml-quants.c quantize_row_q8_K_ref, element by element."""
    qs, ds, bsums = [], [], []
    for b in range(0, len(row), 256):
        x = row[b:b + 256]
        amax, vmax = np.float32(0), np.float32(0)
        for v in x:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax == 0:
            qs += [0] * 256; ds.append(0.0); bsums += [0] * 16
            continue
        iscale = np.float32(-127.0) / vmax
        q = [min(127, int(np.rint(np.float32(iscale * v)))) for v in x]
        qs += q
        bsums += [sum(q[j:j + 16]) for j in range(0, 256, 16)]
        ds.append(np.float32(1) / iscale)
    return np.array(qs), np.array(ds, np.float32), np.array(bsums)


def q8_0_loop(row):
    qs, ds = [], []
    for b in range(0, len(row), 32):
        x = row[b:b + 32]
        d = np.float32(np.abs(x).max() / np.float32(127))
        inv = np.float32(1) / d if d else np.float32(0)
        qs += [int(np.copysign(np.floor(abs(np.float32(v * inv)) + 0.5), v)) for v in x]
        ds.append(np.float16(d).astype(np.float32))
    return np.array(qs), np.array(ds)


@pytest.mark.parametrize("cols", [256, 512])
def test_q8_k_matches_loop(cols):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, cols)).astype(np.float32)
    x[1, :256] = 0  # an all-zero block
    x[2, 5] = -40  # a negative extreme
    act = quantize.quantize_q8_k(x)
    for r in range(3):
        qs, d, bsums = q8_k_loop(x[r])
        np.testing.assert_array_equal(act.qs[r], qs)
        np.testing.assert_array_equal(act.d[r], d)
        np.testing.assert_array_equal(act.bsums[r], bsums)
    assert quantize.nmse(act.dequantize()[0], x[0]) < 1e-4  # row 2 holds an outlier: coarse by design


def test_q8_0_and_q8_1_match_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (2, 96)).astype(np.float32)
    a0, a1 = quantize.quantize_q8_0(x), quantize.quantize_q8_1(x)
    for r in range(2):
        qs, d = q8_0_loop(x[r])
        np.testing.assert_array_equal(a0.qs[r], qs)
        np.testing.assert_array_equal(a0.d[r], d)
        np.testing.assert_array_equal(a1.qs[r], qs)
        sums = qs.reshape(-1, 32).sum(1)
        np.testing.assert_array_equal(a1.s[r], (np.float32(np.abs(x[r].reshape(-1, 32)).max(1) / np.float32(127)) * sums).astype(np.float16).astype(np.float32))


def test_activation_types():
    T = quantize.T
    assert quantize.activation_type(T.Q2_K) == T.Q8_K
    assert quantize.activation_type(T.Q4_0) == T.Q8_0
    assert quantize.activation_type(T.Q4_1) == T.Q8_1
    assert quantize.activation_type(T.F16) is None


def test_bad_shape():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize.quantize_q8_k(np.zeros((1, 100), np.float32))
