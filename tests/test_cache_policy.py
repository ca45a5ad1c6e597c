"""Expert-cache replacement policies (engine/stream/policies.py) and the offline optimum."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightstream.engine.stream.policies import POLICIES, DecayedFrequency, belady_hits, make_policy, replay, simulate


def run(policy, trace, capacity):
    """The keys each miss evicted, in order."""
    return [old for _, _, old in replay(trace, capacity, policy) if old is not None]


def test_lru_evicts_the_least_recently_used():
    assert run("lru", "abcadeb", 3) == ["b", "c", "a"]


def test_lfu_evicts_the_least_frequently_used_oldest_first():
    # a used 3 times, b twice, c once: d evicts c; then e evicts d, the only key used once
    assert run("lfu", "aaabbcde", 3) == ["c", "d"]


def test_decay_forgets_an_old_favourite():
    # x was hot long ago; y and z are used now: with a short half-life x goes first, where LFU
    # keeps it
    trace = ["x"] * 8 + ["y", "z"] * 6 + ["w"]
    p = DecayedFrequency(3, half_life=2)
    for i, key in enumerate(trace[:-1]):
        p.insert(key) if key not in trace[:i] else p.touch(key)
    assert p.victim() == "x"
    assert run("lfu", trace, 3) == ["y"]


def test_decay_survives_a_long_run():
    # far past the point where 2**(t / half_life) would overflow without rebasing
    rng = np.random.default_rng(0)
    trace = rng.zipf(1.3, 200_000) % 50
    hits = simulate(trace.tolist(), 8, "decay")
    assert 0 < hits < len(trace)


def test_belady_textbook_example():
    # Silberschatz's reference string, 3 frames: the optimal policy takes 9 page faults of 20
    trace = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    assert belady_hits(trace, 3) == 20 - 9
    assert simulate(trace, 3, "lru") == 20 - 12  # and LRU 12


def test_only_cold_misses_when_everything_fits():
    trace = list("abcabcabd")
    for policy in POLICIES:
        assert simulate(trace, 4, policy) == len(trace) - 4
    assert belady_hits(trace, 4) == len(trace) - 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=300), st.integers(1, 8))
def test_no_policy_beats_belady(trace, capacity):
    best = belady_hits(trace, capacity)
    for policy in POLICIES:
        assert simulate(trace, capacity, policy) <= best


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        make_policy("fifo", 4)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        simulate([1, 2], 0)


def test_sweep_rises_with_capacity_and_stays_under_the_optimum():
    from weightstream.engine.stream.policies import sweep

    trace = (np.random.default_rng(1).zipf(1.5, 3000) % 64).tolist()
    rows = sweep(trace, [4, 16, 64])
    for policy in ("belady", *POLICIES):
        rates = [r[policy] for r in rows]
        assert rates == sorted(rates), policy  # more slots never hurt on this trace
    for r in rows:
        assert all(r[p] <= r["belady"] for p in POLICIES)
    assert rows[-1]["belady"] == (len(trace) - len(set(trace))) / len(trace)  # all fit: cold misses only
