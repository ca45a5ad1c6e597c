"""Weight quantizers (weightstream.kernels.quantize_weights) against gguf's dequantizers and naive min/max rounding."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import reference
from weightstream.kernels.quantize_weights import SUPPORTED, quantize

K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
assert set(SUPPORTED) == set(K_QUANTS + LEGACY)

# RMSE / std of Gaussian weights (64 x 1024, seed 1), measured then rounded up by ~5-10 %:
# tight enough that a wrong scale search or a lost bit plane fails, loose enough for float
# summation order. The figures match the bits per weight: each extra bit about halves the error.
RMSE_BUDGET = {
    T.Q2_K: 0.31, T.Q3_K: 0.16, T.Q4_K: 0.077, T.Q5_K: 0.039, T.Q6_K: 0.019,
    T.Q4_0: 0.087, T.Q4_1: 0.075, T.Q5_0: 0.044, T.Q5_1: 0.037, T.Q8_0: 0.0055,
}


def gaussian(rows=64, cols=1024, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def awkward_cases():
    """name -> float32[rows, cols] (cols a multiple of 256, so every type takes them)."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal((3, 512), dtype=np.float32)
    outliers = g.copy()
    outliers[:, ::97] *= 50
    return {
        "zeros": np.zeros((2, 256), np.float32),
        "constant": np.array([[0.75] * 256, [-3.0] * 256], np.float32),
        "outliers": outliers,
        "negative_only": -np.abs(g) - 0.1,
        "positive_only": np.abs(g) + 0.1,
        "tiny": g * np.float32(1e-8),
        "mixed_rows": np.concatenate([g[:1], np.zeros((1, 512), np.float32), g[1:2] * np.float32(1e3)]),
        "large": rng.standard_normal((4, 4096), dtype=np.float32) * np.float32(0.02),
    }


def dequant(raw, qtype):
    return gguf.quants.dequantize(raw, qtype)


def rel_rmse(y, w):
    return float(np.sqrt(np.mean((y.astype(np.float64) - w) ** 2)) / w.std())


# ---------------------------------------------------------------------------
# Round trip: the bytes are valid blocks that both dequantizers read identically
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_round_trip_awkward(qtype, use_imatrix):
    rng = np.random.default_rng(3)
    for name, w in awkward_cases().items():
        imatrix = rng.lognormal(0, 1.5, w.shape[1]).astype(np.float32) if use_imatrix else None
        raw = quantize(w, qtype, imatrix)
        bpr = gguf.quants.quant_shape_to_byte_shape(w.shape, qtype)[1]
        assert raw.dtype == np.uint8 and raw.shape == (w.shape[0], bpr), name
        ours = dequant(raw, qtype)
        ref = reference.dequantize(raw, qtype)
        assert ours.shape == w.shape and ours.dtype == np.float32, name
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32), err_msg=name)
        assert np.isfinite(ours).all(), name
        # every row comes back within its own scale (a garbled block would not)
        amax = np.abs(w).max(axis=1, keepdims=True)
        err = np.abs(ours - w).max(axis=1, keepdims=True)
        limit = 0.75 * amax if qtype in (T.Q2_K, T.Q3_K) else 0.3 * amax
        # fp16 scales cannot hold 1e-8-sized steps: those rows may collapse to 0 (as in llama.cpp)
        assert (err <= np.maximum(limit, 1e-7)).all(), (name, (err / np.maximum(amax, 1e-30)).max())
        if name == "zeros":
            assert not ours.any()
        if name == "mixed_rows":
            assert not ours[1].any()
        if name == "constant":
            np.testing.assert_allclose(ours, w, rtol=5e-3)  # fp16 d, 6-bit codes


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_round_trip_576_wide(qtype):
    """SmolLM2's 576-wide rows: the legacy types are the fallback for them."""
    w = gaussian(5, 576, seed=4)
    raw = quantize(w, qtype)
    np.testing.assert_array_equal(dequant(raw, qtype).view(np.uint32),
                                  reference.dequantize(raw, qtype).view(np.uint32))
    assert rel_rmse(dequant(raw, qtype), w) < RMSE_BUDGET[qtype] * 1.1


# ---------------------------------------------------------------------------
# Error: under a named budget and strictly below naive min/max rounding of the same format
# ---------------------------------------------------------------------------


def _rint_clip(v, lo, hi):
    return np.clip(np.rint(v), lo, hi)


def _f16(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def naive_k(w, qtype):
    """Min/max rounding in the k-quant format: each sub-block's range maps onto the levels, the
    sub-block scales (and mins) onto their 4/6/8-bit codes against the super-block maximum,
    fp16 super-block scales, then the weights are rounded to the stored grid. Returns the
    reconstruction, float32 like w."""
    sub = {T.Q2_K: 16, T.Q3_K: 16, T.Q4_K: 32, T.Q5_K: 32, T.Q6_K: 16}[qtype]
    x = w.reshape(-1, 256 // sub, sub).astype(np.float32)          # [super-block, sub-block, elem]
    if qtype in (T.Q2_K, T.Q4_K, T.Q5_K):                           # x ~ d*sc*q - dmin*m, q >= 0
        nmax = {T.Q2_K: 3, T.Q4_K: 15, T.Q5_K: 31}[qtype]
        top = 15 if qtype == T.Q2_K else 63
        lo = np.minimum(x.min(axis=2), 0)
        scale = (x.max(axis=2) - lo) / nmax
        mins = -lo
        smax = scale.max(axis=1, keepdims=True)
        mmax = mins.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(smax > 0, _rint_clip(scale * top / smax, 0, top), 0)
            mc = np.where(mmax > 0, _rint_clip(mins * top / mmax, 0, top), 0)
        dl = (_f16(smax / top) * sc)[:, :, None]
        ml = (_f16(mmax / top) * mc)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(dl > 0, _rint_clip((x + ml) / dl, 0, nmax), 0)
        y = dl * q - ml
    else:                                                           # x ~ d*sc*q, q signed
        nmax, code_max = (4, 32) if qtype == T.Q3_K else (32, 128)
        idx = np.abs(x).argmax(axis=2)[:, :, None]
        scale = np.take_along_axis(x, idx, axis=2)[:, :, 0] / -nmax
        jdx = np.abs(scale).argmax(axis=1)[:, None]
        smax = np.take_along_axis(scale, jdx, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(smax != 0, -code_max / smax, 0)
            sc = _rint_clip(iscale * scale, -code_max, code_max - 1)
            dl = (_f16(np.where(iscale != 0, 1 / iscale, 0)) * sc)[:, :, None]
            q = np.where(dl != 0, _rint_clip(x / dl, -nmax, nmax - 1), 0)
        y = dl * q
    return y.reshape(w.shape).astype(np.float32)


def naive(w, qtype):
    if qtype in LEGACY:  # gguf's quantizers are llama.cpp's min/max reference rounding
        return dequant(gguf.quants.quantize(w, qtype), qtype)
    return naive_k(w, qtype)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_error_budget_and_below_naive(qtype):
    w = gaussian()
    err = rel_rmse(dequant(quantize(w, qtype), qtype), w)
    base = rel_rmse(naive(w, qtype), w)
    assert err < RMSE_BUDGET[qtype], (err, base)
    assert err < base, (err, base)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_below_naive_with_outliers(qtype):
    """Heavy-tailed weights (Student t, 3 dof): min/max rounding wastes levels on the tails."""
    w = np.random.default_rng(5).standard_t(3, (32, 1024)).astype(np.float32)
    assert rel_rmse(dequant(quantize(w, qtype), qtype), w) < rel_rmse(naive(w, qtype), w)


def test_naive_k_is_a_fair_baseline():
    """The test's own naive quantizer must itself be sane: coarse but within its format's reach."""
    w = gaussian()
    for qtype, hi in [(T.Q2_K, 0.45), (T.Q3_K, 0.25), (T.Q4_K, 0.1), (T.Q5_K, 0.05), (T.Q6_K, 0.025)]:
        e = rel_rmse(naive_k(w, qtype), w)
        assert RMSE_BUDGET[qtype] * 0.5 < e < hi, (qtype.name, e)


# ---------------------------------------------------------------------------
# imatrix: important columns are fitted better
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_imatrix_lowers_weighted_error(qtype):
    rng = np.random.default_rng(11)
    w = gaussian(32, 1024, seed=12)
    imatrix = rng.lognormal(0, 2, 1024).astype(np.float32)   # skewed: a few columns dominate
    imatrix[rng.choice(1024, 16, replace=False)] *= 100

    def weighted(raw):
        return float(np.sum(imatrix * (dequant(raw, qtype).astype(np.float64) - w) ** 2))

    plain = weighted(quantize(w, qtype))
    with_imatrix = weighted(quantize(w, qtype, imatrix))
    assert with_imatrix < plain, (with_imatrix, plain)


def test_uniform_imatrix_is_close_to_plain():
    """A flat importance vector carries no information: error stays at the plain level."""
    w = gaussian(16, 1024)
    flat = np.ones(1024, np.float32)
    for qtype in SUPPORTED:
        e_plain = rel_rmse(dequant(quantize(w, qtype), qtype), w)
        e_flat = rel_rmse(dequant(quantize(w, qtype, flat), qtype), w)
        assert e_flat < e_plain * 1.08, (qtype.name, e_flat, e_plain)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_input():
    w = gaussian(2, 512)
    with pytest.raises(ValueError, match="float32"):
        quantize(w.astype(np.float64), T.Q4_K)
    with pytest.raises(ValueError, match="float32"):
        quantize(w.reshape(-1), T.Q4_K)
    with pytest.raises(ValueError, match="float32"):
        quantize(w.tolist(), T.Q4_K)
    with pytest.raises(ValueError, match=r"256-element blocks.*\(2, 576\)"):
        quantize(gaussian(2, 576), T.Q2_K)
    with pytest.raises(ValueError, match=r"32-element blocks.*\(2, 40\)"):
        quantize(gaussian(2, 40), T.Q4_0)
    for bad in (T.F16, T.IQ2_XXS, T.Q8_K):
        with pytest.raises(ValueError, match="not supported"):
            quantize(w, bad)
    with pytest.raises(ValueError, match="unknown GGML type"):
        quantize(w, 12345)
    nan = w.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(nan, T.Q8_0)
    with pytest.raises(ValueError, match=r"imatrix must be float32\[512\]"):
        quantize(w, T.Q4_K, np.ones(256, np.float32))
    with pytest.raises(ValueError, match=r"imatrix must be float32\[512\]"):
        quantize(w, T.Q4_K, np.ones(512, np.float64))
    with pytest.raises(ValueError, match=">= 0"):
        quantize(w, T.Q4_K, -np.ones(512, np.float32))
    for big in (1e30, 1e7):  # beyond float32 squares / beyond fp16 scales
        with pytest.raises(ValueError, match="overflow fp16"):
            quantize(w * np.float32(big), T.Q4_K)


def test_empty_and_int_qtype():
    assert quantize(np.zeros((0, 256), np.float32), T.Q2_K).shape == (0, 84)
    w = gaussian(2, 256)
    np.testing.assert_array_equal(quantize(w, int(T.Q6_K)), quantize(w, T.Q6_K))


# ---------------------------------------------------------------------------
# The batched search against a line-by-line transcription of ggml's make_qkx2_quants
# ---------------------------------------------------------------------------


def make_qkx2_loop(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx2_quants, one group, float32 scalars in ggml's order."""
    f = np.float32
    n = len(x)
    mn, mx = f(x.min()), f(x.max())
    sum_w, sum_x = f(0), f(0)
    for i in range(n):
        sum_w = f(sum_w + w[i])
        sum_x = f(sum_x + f(w[i] * x[i]))
    mn = min(mn, f(0))
    if mx == mn:
        return f(0), -mn, np.zeros(n)
    iscale = f(nmax / f(mx - mn))
    scale = f(1 / iscale)
    L = np.clip(np.rint(f(iscale) * (x - mn)), 0, nmax).astype(np.float32)

    def err(s, m, lv):
        d = (s * lv + m - x).astype(np.float32)
        return f(np.sum(w * (np.abs(d) if use_mad else d * d), dtype=np.float32))

    best = err(scale, mn, L)
    for step in range(nstep + 1):
        iscale = f(f(f(rmin + f(rdelta * step)) + nmax) / f(mx - mn))
        la = np.clip(np.rint(iscale * (x - mn)), 0, nmax).astype(np.float32)
        sl, sl2, sxl = (f(np.sum(w * la, dtype=np.float32)), f(np.sum(w * la * la, dtype=np.float32)),
                        f(np.sum(w * la * x, dtype=np.float32)))
        D = f(sum_w * sl2 - sl * sl)
        if D > 0:
            ts = f((sum_w * sxl - sum_x * sl) / D)
            tm = f((sl2 * sum_x - sl * sxl) / D)
            if tm > 0:
                tm, ts = f(0), f(sxl / sl2)
            cur = err(ts, tm, la)
            if cur < best:
                L, best, scale, mn = la, cur, ts, tm
    return scale, -mn, L


@pytest.mark.parametrize("n, nmax, params, use_mad", [
    (16, 3, (-0.5, 0.1, 15), True),    # Q2_K reference
    (32, 15, (-1.0, 0.1, 20), False),  # Q4_K reference
    (32, 31, (-0.9, 0.05, 36), False),  # Q5_K / Q5_1 with imatrix (make_qkx3's parameters)
])
def test_batched_search_matches_ggml_loop(n, nmax, params, use_mad):
    from weightstream.kernels.numba import quantize as nq

    rng = np.random.default_rng(21)
    G = 300
    x = rng.standard_normal((G, n)).astype(np.float32)
    x[::7] = np.abs(x[::7])           # some all-positive groups (min clamped to 0)
    x[::11] -= 3                        # some all-negative ones
    x[5] = 0                            # a constant group
    w = (np.abs(x) + rng.uniform(0, 1, (G, n))).astype(np.float32)
    f = np.float32
    Lt = np.empty((n, G), np.float32)
    scale, the_min = np.empty(G, np.float32), np.empty(G, np.float32)
    nq._qkx_many(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), Lt, nmax, f(params[0]), f(params[1]),
                 params[2], use_mad, scale, the_min)
    same = 0
    for g in range(G):
        s_ref, m_ref, L_ref = make_qkx2_loop(x[g], w[g], nmax, f(params[0]), f(params[1]), params[2], use_mad)
        if np.array_equal(Lt[:, g], L_ref):
            same += 1
            # the min comes out of a cancelling least-squares formula: compare it on the group's range
            np.testing.assert_allclose(scale[g], s_ref, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(the_min[g], m_ref, rtol=0, atol=1e-4 * (abs(s_ref) * nmax + 1e-6))
    # summation order differs (vectorised sums): a near-tie between two trial scales may go the
    # other way in a few groups, never in many
    assert same >= 0.97 * G, same
