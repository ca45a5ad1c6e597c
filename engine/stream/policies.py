"""Which cached expert to evict: the replacement policies of the expert cache, and the offline
optimum (Belady) they are measured against.

A key is whatever names a cached item, e.g. (layer, expert). A policy only orders keys; the cache
that owns the slots (memory, I/O) asks it which key to give up. Every operation is O(1) or
O(log n) so a policy costs nothing next to a multi-MiB read.

    POLICIES["lru" | "lfu" | "decay"](capacity)   touch / insert / victim / victim_excluding / remove
    simulate(trace, capacity, "lru") -> hits      replay a recorded trace through a policy
    replay(trace, capacity, "lru")                ... access by access: (key, hit, evicted)
    belady_hits(trace, capacity) -> hits          the best any policy could do on that trace

"decay" is frequency with recency decay (each access adds 1 to a key's score, and all scores
halve every `half_life` accesses): it keeps experts a layer routes to often, like LFU, but lets a
once-popular expert age out, like LRU. flash-moe's traces show both effects (per-layer skew and
temporal reuse; ../shared/notes/).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from typing import Hashable, Iterable, Sequence


class LRU:
    """Evict the key used longest ago."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def touch(self, key) -> None:
        self._order.move_to_end(key)

    def insert(self, key) -> None:
        self._order[key] = None

    def victim(self, incoming=None):
        return next(iter(self._order))

    def victim_excluding(self, skip, incoming=None) -> Hashable | None:
        """The key to evict for `incoming` among those not in `skip` (keys in use or being read),
        or None."""
        return next((k for k in self._order if k not in skip), None)

    def remove(self, key) -> None:
        del self._order[key]

    def __len__(self) -> int:
        return len(self._order)


class _ScoredHeap:
    """Keys ordered by a score (lowest evicted first, ties: least recently used first), with lazy
    deletion: a key's newest heap entry is the only valid one."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._heap: list[tuple[float, int, Hashable]] = []
        self._entry: dict[Hashable, tuple[float, int]] = {}  # key -> its valid (score, tick)
        self._tick = itertools.count()

    def _push(self, key, score: float) -> None:
        entry = (score, next(self._tick))
        self._entry[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 4 * max(16, len(self._entry)):  # too many stale entries: rebuild
            self._heap = [(*e, k) for k, e in self._entry.items()]
            heapq.heapify(self._heap)

    def victim(self, incoming=None):
        while True:
            score, tick, key = self._heap[0]
            if self._entry.get(key) == (score, tick):
                return key
            heapq.heappop(self._heap)

    def victim_excluding(self, skip, incoming=None) -> Hashable | None:
        """The key to evict among those not in `skip` (keys in use or being read), or None."""
        held = []  # valid entries passed over, pushed back after
        try:
            while self._heap:
                score, tick, key = self._heap[0]
                if self._entry.get(key) != (score, tick):
                    heapq.heappop(self._heap)
                elif key in skip:
                    held.append(heapq.heappop(self._heap))
                else:
                    return key
            return None
        finally:
            for item in held:
                heapq.heappush(self._heap, item)

    def remove(self, key) -> None:
        del self._entry[key]

    def __len__(self) -> int:
        return len(self._entry)


class LFU(_ScoredHeap):
    """Evict the cached key used least often (ties: least recently used). Counts are kept for keys
    no longer cached ("perfect" LFU): a returning popular expert comes back with its count, and a
    newcomer, counted once, is the next to go. This is what keeps a cache smaller than one token's
    experts from cycling: the popular experts stay while the rest pass through one slot."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._count: dict[Hashable, int] = {}  # every key seen, cached or not

    def insert(self, key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._push(key, self._count[key])

    def touch(self, key) -> None:
        self._count[key] += 1
        self._push(key, self._count[key])


class DecayedFrequency(_ScoredHeap):
    """Evict the cached key with the lowest access count decayed by age: an access at time t adds
    2**(t / half_life) to the key's score, which orders keys exactly as adding 1 and halving every
    score each half_life accesses would, without touching every key on every access. Scores are
    kept for keys no longer cached, as in LFU."""

    def __init__(self, capacity: int, half_life: float | None = None):
        super().__init__(capacity)
        # 32 x capacity accesses: long enough that popular experts outlive a cache-sized scan (a
        # token visits every layer), short enough to follow routing that drifts over ~100 tokens
        self.half_life = half_life or max(1.0, 32.0 * capacity)
        self._now = 0
        self._score: dict[Hashable, float] = {}  # every key seen, cached or not
        self._rebase_at = 512 * self.half_life  # keep 2**(t/h) far from float overflow

    def _bump(self, key, base: float) -> None:
        self._now += 1
        if self._now >= self._rebase_at:  # scale every score down by the same factor: order kept
            shift = 2.0 ** (-self._now / self.half_life)
            self._score = {k: s * shift for k, s in self._score.items()}
            cached = [k for k in self._entry if k != key]
            self._heap, self._entry = [], {}
            for k in cached:
                self._push(k, self._score[k])
            base *= shift
            self._now = 0
        self._score[key] = base + 2.0 ** (self._now / self.half_life)
        self._push(key, self._score[key])

    def insert(self, key) -> None:
        self._bump(key, self._score.get(key, 0.0))

    def touch(self, key) -> None:
        self._bump(key, self._score[key])


POLICIES = {"lru": LRU, "lfu": LFU, "decay": DecayedFrequency}
# No cache of our own: every use reads again with a buffered pread and the OS page cache decides
# what stays (engine/stream/store.py). Offered beside the policies above under the same option.
PAGE_CACHE = "page-cache"
CACHE_POLICIES = (*POLICIES, PAGE_CACHE)  # what Engine.load's cache_policy and --cache-policy accept


def make_policy(name: str, capacity: int):
    try:
        return POLICIES[name](capacity)
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; expected one of {', '.join(POLICIES)}") from None


def replay(trace: Iterable[Hashable], capacity: int, policy: str = "lru"):
    """Run `trace` (keys in access order) through a cache of `capacity` items: yields, per access,
    (key, hit, the key it evicted or None)."""
    if capacity < 1:
        raise ValueError(f"simulate: capacity must be >= 1, got {capacity}")
    p, cached = make_policy(policy, capacity), set()
    for key in trace:
        if key in cached:
            p.touch(key)
            yield key, True, None
            continue
        old = None
        if len(cached) >= capacity:
            old = p.victim(key)
            p.remove(old)
            cached.discard(old)
        cached.add(key)
        p.insert(key)
        yield key, False, old


def simulate(trace: Iterable[Hashable], capacity: int, policy: str = "lru") -> int:
    """Hits when `trace` runs through a cache of `capacity` items under `policy`."""
    return sum(hit for _, hit, _ in replay(trace, capacity, policy))


def belady_hits(trace: Sequence[Hashable], capacity: int) -> int:
    """Hits of the optimal offline policy (evict the item whose next use is furthest away, never
    used again first): no policy can do better on this trace at this capacity."""
    if capacity < 1:
        raise ValueError(f"belady_hits: capacity must be >= 1, got {capacity}")
    next_use = [math.inf] * len(trace)  # index of the next access of trace[i]'s key
    last: dict[Hashable, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = last.get(trace[i], math.inf)
        last[trace[i]] = i
    cached: dict[Hashable, float] = {}  # key -> its next use
    heap: list[tuple[float, int, Hashable]] = []  # (-next use, tiebreak, key), lazily invalidated
    hits = 0
    for i, key in enumerate(trace):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                neg_next, _, k = heapq.heappop(heap)
                if cached.get(k) == -neg_next:
                    del cached[k]
                    break
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return hits


def sweep(trace: Sequence[Hashable], capacities: Iterable[int], policies: Iterable[str] = tuple(POLICIES)) -> list[dict]:
    """Hit rate of each policy and of the optimum at each capacity: [{capacity, belady, lru, ...}]
    (the profiler's "our hit rate against the offline optimum" table)."""
    n = max(1, len(trace))
    rows = []
    for c in capacities:
        row = {"capacity": c, "belady": belady_hits(trace, c) / n}
        row.update({p: simulate(trace, c, p) / n for p in policies})
        rows.append(row)
    return rows
