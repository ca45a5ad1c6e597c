"""Sampler: each filter against a direct computation on small logits."""
import numpy as np
import pytest

from weightstream.engine.runtime.sampling import Sampler, SamplingParams, apply_repeat_penalty

LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0], dtype=np.float32)


def draws(params, n=3000, logits=LOGITS):
    s = Sampler(params)
    return np.array([s(logits) for _ in range(n)])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 3


def test_top_k_keeps_only_the_k_best():
    got = set(draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0)))
    assert got == {3, 0}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.exp(LOGITS - LOGITS.max()); probs /= probs.sum()
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    p = float(mass[1]) + 1e-3  # needs the third token to reach p
    got = set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=p, min_p=0.0, seed=0)))
    assert got == set(order[:3].tolist())


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = np.exp(LOGITS - LOGITS.max())  # relative to the best token
    got = set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=0)))
    assert got == set(np.nonzero(probs >= 0.3)[0].tolist())


def test_temperature_distribution_matches_softmax():
    n = 20000
    counts = np.bincount(draws(SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1), n), minlength=6)
    p = np.exp(LOGITS / 0.7 - (LOGITS / 0.7).max()); p /= p.sum()
    np.testing.assert_allclose(counts / n, p, atol=0.015)


def test_seed_reproduces_and_differs():
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = draws(SamplingParams(seed=7, **params), 50)
    b = draws(SamplingParams(seed=7, **params), 50)
    c = draws(SamplingParams(seed=8, **params), 50)
    assert (a == b).all() and (a != c).any()


def test_repeat_penalty_as_llama_cpp():
    out = apply_repeat_penalty(LOGITS, [3, 4, 3], 2.0)
    expected = LOGITS.copy(); expected[3] = 1.5; expected[4] = -2.0
    np.testing.assert_array_equal(out, expected)
    assert Sampler(SamplingParams(repeat_penalty=2.0))(LOGITS, history=[3]) == 0  # 3.0/2 < 2.0


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5), dict(repeat_penalty=0)])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
