"""The one generation thread: the engine's generation blocks (a forward pass is seconds of CPU on a
big model), so it runs here, never on the event loop; its tokens reach the request's coroutine
through an asyncio.Queue fed with loop.call_soon_threadsafe.

One engine holds one sequence (runtime/engine.py), so generations take turns: requests wait in a
bounded queue (`max_queue` waiting, the running one not counted) and a request that finds it full
is refused (QueueFull -> 503). A job whose client went away is cancelled: skipped if still waiting,
stopped between tokens if running (its generator is closed, which frees the engine)."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """max_queue requests are already waiting."""


@dataclass
class Job:
    """One generation: what to run (prompt token ids, engine.stream's arguments) and what happened."""
    ids: list[int]
    max_tokens: int
    stop: list[str]
    sampling: dict  # SamplingParams fields: temperature, top_p, top_k, min_p, repeat_penalty, seed
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) ... ("done", reason) | ("error", exc)
    state: str = "waiting"  # -> running -> done | cancelled
    cancel: threading.Event = field(default_factory=threading.Event)
    t_queued: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    t_first: float | None = None  # the first piece of text handed to the client
    t_end: float | None = None
    generated: int = 0  # tokens the engine generated for this job
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"

    def put(self, kind: str, value) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
            self.cancel.set()


class GenerationWorker:
    """Runs jobs one at a time on `engine` in a daemon thread. Counters are read by the figures
    (serve/figures.py) from other threads: plain ints and a deque, each replaced or appended whole."""

    def __init__(self, engine, max_queue: int = 8):
        if max_queue < 0:
            raise ValueError(f"serve: max_queue must be >= 0 (requests waiting beside the running one), got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards waiting and each job's state
        self.waiting = 0  # queue depth: jobs submitted and neither started nor cancelled
        self.running: Job | None = None
        self.finished: deque[Job] = deque(maxlen=64)  # the latest jobs, newest last (tests check turns)
        self.generations = self.cancelled = self.rejected = self.generated_tokens = 0
        self.ttft_sum, self.ttft_count = 0.0, 0
        self._thread = threading.Thread(target=self._loop, name="weightstream-generate", daemon=True)
        self._thread.start()

    # ---- the event loop's side --------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting + (self.running is not None) > self.max_queue:  # room: one running + max_queue
                self.rejected += 1
                raise QueueFull(f"the server is busy: {self.waiting} request(s) already waiting "
                                f"(--max-queue {self.max_queue}) beside the one generating; retry later")
            self.waiting += 1
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job is dropped now, a running one stops at its next token."""
        job.cancel.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "cancelled"
                job.finish_reason = "cancelled"
                self.waiting -= 1
                self.cancelled += 1

    def cancel_all(self) -> None:
        """The server is stopping: the running job ends at its next token, waiting ones are dropped
        (their responses end, so the server need not wait for them)."""
        with self._lock:
            jobs = [j for j in (self.running, *self._jobs.queue) if j is not None]
        for job in jobs:
            self.cancel(job)

    def close(self) -> None:
        """Stop the thread, cancelling what it has."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # ---- the generation thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.state == "cancelled":
                    continue
                job.state, self.running = "running", job
                self.waiting -= 1
            try:
                error = self._generate(job)
            finally:
                with self._lock:  # the counters move with `running`: a snapshot never counts a job twice
                    self.generated_tokens += job.generated
                    self.generations += 1
                    self.cancelled += job.finish_reason == "cancelled"
                    self.running = None
                    job.state = "cancelled" if job.finish_reason == "cancelled" else "done"
                self.finished.append(job)
            # told last, so a client that has its answer finds the job's bookkeeping done
            if error is not None:
                job.put("error", error)
            else:
                job.put("done", job.finish_reason)

    def _generate(self, job: Job) -> Exception | None:
        """Run job on the engine, handing its text over piece by piece; the error, if it failed."""
        engine = self.engine
        if engine.profiler is not None:
            engine.profiler.clear()  # the figures describe this generation; the records stay bounded
        job.t_start = time.perf_counter()
        pieces = engine.stream(job.ids, job.max_tokens, stop=job.stop, **job.sampling)
        try:
            for piece in pieces:  # one piece per token, but for text held back as a stop string's start
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    break
                if job.t_first is None:
                    job.t_first = time.perf_counter()
                    self.ttft_sum += job.t_first - job.t_queued
                    self.ttft_count += 1
                job.put("text", piece)
            else:
                # the engine stops at an end-of-generation token, a stop string or max_tokens; only
                # the last leaves all max_tokens generated
                job.finish_reason = "length" if engine.last_stats.generated_tokens >= job.max_tokens else "stop"
        except Exception as e:  # noqa: BLE001 (any failure is the client's answer, the server lives on)
            job.finish_reason = "error"
            return e
        finally:
            pieces.close()  # a cancelled generation ends here: the engine is free for the next job
            job.t_end = time.perf_counter()
            job.generated = engine.last_stats.generated_tokens
        return None
