"""Routed experts read from the GGUF file into a fixed pool of memory slots, ahead of use.

One expert of one layer = its rows of the three stacked tensors ffn_gate_exps, ffn_up_exps and
ffn_down_exps: three byte ranges of the file, read by the reader threads (engine/stream/reader.py)
straight into one slot. With stream="ffn" a dense layer's FFN is one more "expert" (number 0 of
its layer), always chosen. The slots are allocated once, page-aligned, so a token allocates
nothing and O_DIRECT reads land in them as they are. Which expert to give up when the pool is
full is the policy's call (engine/stream/policies.py); experts in use or being read are never
given up.

    store = ExpertStore(gguf_file, n_slots=64, policy="lru", io="auto", io_threads=4)
    for e, (gate, up, down) in store.fetch(layer, experts):   # ready ones first, then as reads land
        ...                                                  # the views are valid until the next step
    store.prefetch(layer + 1, predicted)                     # reads queued behind the demand reads
    store.stats                                              # hits, misses, bytes read, prefetches

policy="page-cache" keeps nothing of its own: every use reads the expert again with a buffered
pread (the slots only hold the experts of the layer at hand and of the prefetches), leaving
caching to the operating system's page cache, which is what flash-moe found best on macOS.

Every expert read is checked before it is used (engine/stream/verify.py, in the reader thread):
the file is still the one opened (else ModelFileChangedError) and every block scale is finite
(else NonFiniteWeightsError; ~6-25 us per expert read on the test models, see verify.py). A failed
check fails the read like an I/O error: the slot is freed, nothing wrong is cached.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial


from ...kernels import QTensor

from .layout import expert_layouts
from .policies import PAGE_CACHE, make_policy
from .reader import DEMAND, PREFETCH, ReadJob, ReadPool, ReadRange, aligned_span, region_bytes
from .slots import SlotPool
from ..formats.gguf_file import GGUFError, GGUFFile
from ..errors import ExpertIndexError, ExpertReadTimeout
from .verify import check_scales

READ_TIMEOUT_S = 120.0  # no read of a few MiB takes this long on a working disk: fail, do not hang


@dataclass
class StoreStats:
    hits: int = 0  # found ready in the cache
    late: int = 0  # found being read by a prefetch
    misses: int = 0  # read on demand
    bytes_read: int = 0  # transferred from disk (O_DIRECT reads whole pages)
    expert_bytes: int = 0  # of which the experts' own bytes
    reads: int = 0  # preads
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # evicted before any use
    prefetch_cancelled: int = 0  # dropped from the queue once their layer's routing was known
    stall_s: float = 0.0  # compute thread blocked on reads
    per_layer: dict = field(default_factory=dict)  # layer -> [found, misses]

    @property
    def hit_rate(self) -> float:
        found = self.hits + self.late
        return found / max(1, found + self.misses)


class ExpertStore:
    """A cache of experts in a SlotPool, filled by a ReadPool; see the module docstring."""

    def __init__(self, f: GGUFFile, n_slots: int, policy: str = "lru", io: str = "auto", io_threads: int = 4,
                 dense_ffn: bool = False, profiler=None, timeout_s: float = READ_TIMEOUT_S, sync: bool = False):
        self.path = f.path
        self.layouts = expert_layouts(f, dense_ffn)
        if not self.layouts:
            raise GGUFError(f"{f.path}: nothing to stream (no *_exps tensors{', no dense FFN' if dense_ffn else ''})")
        self.page_cache = policy == PAGE_CACHE
        if self.page_cache and io == "direct":
            raise ValueError("cache_policy='page-cache' reads through the page cache: io='direct' contradicts it")
        self.profiler, self.timeout_s = profiler, timeout_s
        self.sync = sync  # one demand read at a time, each computed before the next is asked (baseline)
        paths = {info.path for lay in self.layouts.values() for info in lay.parts}
        self.reader = ReadPool(paths, io_threads, "buffered" if self.page_cache else io, self._read_done)
        try:
            self.slot_bytes = max(lay.slot_bytes(self.reader.direct) for lay in self.layouts.values())
            self.pool = SlotPool(n_slots, self.slot_bytes)
            self.policy = make_policy("lru" if self.page_cache else policy, n_slots)
        except BaseException:
            self.reader.close()
            raise
        self._slot_of: dict[tuple[int, int], int] = {}  # key -> slot, for keys ready or being read
        self._job_of: dict[tuple[int, int], ReadJob] = {}  # key -> its read, until the consumer sees it done
        self._views_of: dict[tuple[int, int], tuple[QTensor, QTensor, QTensor]] = {}
        self._pinned: set[tuple[int, int]] = set()  # keys the current layer uses: never evicted
        self._prefetched: set[tuple[int, int]] = set()  # keys read by a prefetch, not yet used
        self._free = list(range(n_slots - 1, -1, -1))
        self.stats = StoreStats()

    @property
    def n_slots(self) -> int:
        return self.pool.slots.shape[0]

    @property
    def direct(self) -> bool:
        return self.reader.direct

    # ---- the consumer's side ------------------------------------------------------------------
    def fetch(self, layer: int, experts):
        """Yield batches [(expert, (gate, up, down)), ...] covering `experts` (distinct ids): first
        every cached one, then each group of reads that has landed. A batch's views are valid
        until the next step of the loop."""
        keys = [(layer, int(e)) for e in experts]
        self._cancel_prefetches(layer, set(keys))
        self._pinned.update(keys)
        counts = self.stats.per_layer.setdefault(layer, [0, 0])
        ready, waiting, missing = [], [], []
        for key in keys:
            job = self._job_of.get(key)
            if key in self._slot_of:
                outcome = "late" if job is not None and not job.finished else "hit"
                (waiting if outcome == "late" else ready).append(key)
                if outcome == "late":
                    self.reader.promote(job)
                    self.stats.late += 1
                else:
                    self.stats.hits += 1
                counts[0] += 1
                self.policy.touch(key)
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_used += 1
                    self._event(key, "used")
            else:
                outcome = "miss"
                self.stats.misses += 1
                counts[1] += 1
                missing.append(key)
            if self.profiler is not None:
                self.profiler.access(layer, key[1], outcome)
        try:
            missing.reverse()  # pop() takes them in the order asked
            self._issue(missing, waiting, DEMAND)
            batch = ready
            while batch or waiting or missing:
                if batch:
                    yield [(key[1], self._views_of[key]) for key in batch]
                    for key in batch:
                        self._release(key)
                    self._issue(missing, waiting, DEMAND)
                if waiting:
                    batch = self._wait_any(waiting, layer)
                elif missing:  # every slot is held: wait for any read to land, then try again
                    self._wait_any_read()
                    self._issue(missing, waiting, DEMAND)
                    batch = []
                else:
                    batch = []
        finally:
            for key in keys:
                if key in self._pinned:
                    self._release(key)

    def prefetch(self, layer: int, experts) -> int:
        """Queue reads of the experts of `layer` predicted to be used, behind the demand reads,
        into slots not in use. Returns how many were queued."""
        issued = 0
        for e in experts:
            key = (layer, int(e))
            if key in self._slot_of:
                continue
            slot = self._take_slot(key)
            if slot is None:
                break
            self._submit(key, slot, PREFETCH)
            self._prefetched.add(key)
            self.stats.prefetch_issued += 1
            self._event(key, "issued")
            issued += 1
        return issued

    def summary(self) -> dict:
        """The store's figures since it was made, as Engine.stats() and a pipeline stage report them."""
        st = self.stats
        return {"slots": self.n_slots, "hits": st.hits, "late": st.late, "misses": st.misses,
                "hit_rate": st.hit_rate, "bytes_read": st.bytes_read, "reads": st.reads,
                "stall_s": st.stall_s, "direct_io": self.direct,
                "prefetch": {"issued": st.prefetch_issued, "used": st.prefetch_used,
                             "wasted": st.prefetch_wasted, "cancelled": st.prefetch_cancelled}}

    # ---- slots --------------------------------------------------------------------------------
    def _take_slot(self, incoming=None) -> int | None:
        """A free slot, or the policy's victim (for `incoming`) among keys not in use and not
        being read."""
        if self._free:
            return self._free.pop()
        busy = self._pinned | {k for k, j in self._job_of.items() if not j.finished}
        old = self.policy.victim_excluding(busy, incoming)
        if old is None:
            return None
        if old in self._prefetched:
            self._prefetched.discard(old)
            self.stats.prefetch_wasted += 1
            self._event(old, "wasted")
        return self._drop(old)

    def _drop(self, key) -> int:
        self.policy.remove(key)
        self._job_of.pop(key, None)
        self._views_of.pop(key, None)
        return self._slot_of.pop(key)

    def _release(self, key) -> None:
        self._pinned.discard(key)
        if self.page_cache and key in self._slot_of:  # keep nothing: the OS caches the file
            self._free.append(self._drop(key))

    def _issue(self, missing: list, waiting: list, priority: int) -> None:
        while missing and not (self.sync and waiting):
            slot = self._take_slot(missing[-1])
            if slot is None:
                return
            key = missing.pop()
            self._submit(key, slot, priority)
            waiting.append(key)

    def _submit(self, key, slot: int, priority: int) -> None:
        layer, expert = key
        lay = self.layouts.get(layer)
        if lay is None or not 0 <= expert < lay.n_expert:
            self._free.append(slot)
            raise ExpertIndexError(f"{self.path}: no expert {expert} in layer {layer}")
        dest = self.pool.slots[slot]
        ranges, views, pos = [], [], 0
        for i, info in enumerate(lay.parts):
            n = lay.part_bytes(i)
            offset = info.offset + expert * n
            start, length, head = aligned_span(offset, n, self.direct)
            ranges.append(ReadRange(str(info.path), start, length, head + n, pos, f"{info.name} expert {expert}"))
            shape = lay.part_shape(i)
            views.append(QTensor.view(info.qtype, shape, dest[pos + head:pos + head + n].reshape(shape[0], info.row_bytes)))
            pos += region_bytes(n, self.direct)
        job = ReadJob(key, slot, dest, ranges, priority, wanted=lay.expert_bytes,
                      check=partial(_check_parts, tuple(views)))
        if self.profiler is not None:
            self.profiler.read_queued(job)
        self._slot_of[key], self._job_of[key], self._views_of[key] = slot, job, tuple(views)
        self.policy.insert(key)
        self.reader.submit(job)

    # ---- waiting for reads --------------------------------------------------------------------
    def _wait_any(self, waiting: list, layer: int) -> list:
        """Block until at least one of `waiting`'s reads has landed; remove and return the keys of
        all that have. A failed read frees its slot and raises (after the others are settled), so
        the cache never holds bytes that did not arrive."""
        t0 = time.perf_counter()
        with self.reader.cv:
            while True:
                done = [k for k in waiting if self._job_of[k].finished]
                if done:
                    break
                if time.perf_counter() - t0 > self.timeout_s:
                    raise ExpertReadTimeout(f"{self.path}: no read of layer {layer}'s experts {[k[1] for k in waiting]} "
                                       f"finished within {self.timeout_s:.0f} s")
                self.reader.cv.wait(1.0)  # bounded: the loop re-checks the timeout
        t1 = time.perf_counter()
        self.stats.stall_s += t1 - t0
        if self.profiler is not None and t1 - t0 > 1e-6:
            self.profiler.stall(layer, t0, t1)
        error = None
        for key in done:
            waiting.remove(key)
            job = self._job_of.pop(key)
            self._account(job)
            if job.error is not None:
                self._pinned.discard(key)
                self._free.append(self._drop(key))
                error = error or job.error
        if error is not None:
            raise error
        return done

    def _wait_any_read(self) -> None:
        """Block until some read in flight finishes (its slot can then be given up)."""
        with self.reader.cv:
            if not self.reader.cv.wait_for(lambda: any(j.finished for j in self._job_of.values()), self.timeout_s):
                raise ExpertReadTimeout(f"{self.path}: no expert read finished within {self.timeout_s:.0f} s")
        for key, job in list(self._job_of.items()):
            if job.finished:
                self._finish_background(key, job)

    def _finish_background(self, key, job: ReadJob) -> None:
        """A prefetch that landed before anyone waited for it: account it; drop it if it failed."""
        del self._job_of[key]
        self._account(job)
        if job.error is not None:
            self._prefetched.discard(key)
            self._free.append(self._drop(key))

    def _account(self, job: ReadJob) -> None:
        self.stats.bytes_read += job.nbytes
        self.stats.expert_bytes += job.wanted if job.error is None else 0
        self.stats.reads += len(job.ranges)

    def _cancel_prefetches(self, layer: int, wanted: set) -> None:
        """Drop the queued prefetches of `layer` that its routing did not choose; settle the ones
        that have landed."""
        for key, job in list(self._job_of.items()):
            if job.finished:
                self._finish_background(key, job)
            elif key[0] == layer and key not in wanted and self.reader.cancel(job):
                self._prefetched.discard(key)
                self.stats.prefetch_cancelled += 1
                self._event(key, "cancelled")
                self._free.append(self._drop(key))

    def _read_done(self, job: ReadJob) -> None:  # in a reader thread
        if self.profiler is not None:
            self.profiler.read_done(job)

    def _event(self, key, event: str) -> None:
        if self.profiler is not None:
            self.profiler.prefetch_event(key, event)

    # ---- compatibility: one expert, synchronously ---------------------------------------------
    def get(self, layer: int, expert: int) -> tuple[QTensor, QTensor, QTensor]:
        """(gate, up, down) of one expert, read now if needed. The views stay valid until the
        next call that may evict (use fetch() in the forward pass)."""
        for batch in self.fetch(layer, [expert]):
            return batch[0][1]

    def close(self) -> None:
        if self.pool.slots is None:
            return
        self.reader.close()
        for key, job in list(self._job_of.items()):
            self._account(job)
        self._job_of.clear()
        self.pool.close()


def _check_parts(views, job: ReadJob) -> None:
    """A read job's check (reader thread): every block scale of the expert's parts is finite."""
    for view, r in zip(views, job.ranges):
        check_scales(view, f"{r.path}: {r.what}")
