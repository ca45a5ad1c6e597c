"""The reader: a pool of I/O threads that fill memory slots from the model file with pread.

A job is one expert: a few byte ranges of the file (its gate, up and down slices), each read into
its place in one slot. Jobs wait in a priority queue: reads the current layer is blocked on
(demand) go before reads of experts predicted for a later layer (prefetch), and a queued prefetch
can be promoted when its layer asks for it or cancelled when its layer does not.

os.preadv releases the GIL for the whole read, so the threads overlap the disk with the kernels
(which release it too). Reader threads spend their time blocked in the kernel, not on a core, so
they do not oversubscribe the compute threads; with io="buffered" the page-cache copy does use
CPU, which is one reason io="direct" is the default where the filesystem allows it.

io="direct" opens the file with O_DIRECT: the kernel DMAs straight into our page-aligned slots
and the page cache is neither used nor polluted, so the memory budget is ours to account for.
O_DIRECT needs the file offset, the length and the buffer aligned to the block size, so each
range is widened to whole pages and the data starts `head` bytes into its region (ReadRange).
Filesystems that refuse O_DIRECT (tmpfs, some overlays) fall back to buffered reads, said once.

After each job's reads its thread checks, off the compute thread, that the file is still the one
opened (fstat: size, mtime, inode; engine/stream/verify.py) and runs the job's own check (the
store's: block scales finite), so bytes of a file changed under the engine are an error, not text.

close() never blocks for ever: a reader stuck in a read that does not return (a dead disk or
network filesystem; the consumer gave up after its read timeout) is left behind after
CLOSE_TIMEOUT_S with a warning naming it. It is a daemon thread; its job holds the slot memory it
reads into, and the file descriptors stay open so that its read can never land in another file.
"""
from __future__ import annotations

import heapq
import itertools
import mmap
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ExpertReadError
from .verify import FileIdentity

ALIGN = 4096  # O_DIRECT alignment: the logical block size of every filesystem we meet is <= 4 KiB
DEMAND, PREFETCH = 0, 1  # job priorities: lower is served first
CLOSE_TIMEOUT_S = 2.0  # close() waits this long in all for the readers to finish their current reads

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


@dataclass(frozen=True)
class ReadRange:
    """One pread: `length` bytes at file `offset` into dest[pos : pos + length], of which the first
    `need` must arrive (an O_DIRECT read widened to whole pages may run past the end of the file)."""

    path: str
    offset: int
    length: int
    need: int
    pos: int  # where the read lands in the slot
    what: str  # for errors: "blk.3.ffn_up_exps expert 17"


@dataclass(eq=False)
class ReadJob:
    key: object  # (layer, expert)
    slot: int
    dest: np.ndarray  # uint8 view of the slot the ranges land in
    ranges: list[ReadRange]
    priority: int
    state: str = QUEUED
    error: BaseException | None = None
    thread: int = -1  # which reader thread ran it (the profiler's tracks)
    t_queued: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    nbytes: int = 0  # bytes transferred (O_DIRECT: whole pages)
    wanted: int = 0  # bytes of the expert itself
    forward: int = -1  # the forward pass that queued it (set by the profiler, when there is one)
    _seq: int = 0  # the valid heap entry's sequence number (older entries are stale)
    check: Callable[["ReadJob"], None] | None = None  # run in the reader thread once the bytes landed

    @property
    def finished(self) -> bool:
        return self.state in (DONE, CANCELLED)


def direct_io_supported(path: str) -> bool:
    """Whether `path` can be opened and read with O_DIRECT (probes one aligned block)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    buf = mmap.mmap(-1, ALIGN)  # page-aligned anonymous memory
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


class ReadPool:
    """n_threads readers serving ReadJobs from a priority queue; `cv` is notified when any job
    finishes, so a consumer can wait for whichever of its reads lands first."""

    def __init__(self, paths, n_threads: int = 4, io: str = "auto", on_done=None):
        if io not in ("auto", "direct", "buffered"):
            raise ValueError(f"io must be 'auto', 'direct' or 'buffered', got {io!r}")
        if n_threads < 1:
            raise ValueError(f"need at least one reader thread, got {n_threads}")
        paths = sorted({str(p) for p in paths})
        direct = io == "direct" or (io == "auto" and all(direct_io_supported(p) for p in paths))
        if io == "direct" and not all(direct_io_supported(p) for p in paths):
            raise OSError(f"io='direct': the filesystem of {paths[0]} refuses O_DIRECT; use io='buffered' or 'auto'")
        self.direct = direct
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        self._fds = {p: os.open(p, flags) for p in paths}
        # what each file is now; compared after every job (identity=... : what the caller loaded)
        self.identities = {p: FileIdentity.of(p, fd) for p, fd in self._fds.items()}
        self.stuck: list[str] = []  # names of reader threads close() had to leave in a read
        self.on_done = on_done  # called in the reader thread after each job (the profiler's hook)
        self.cv = threading.Condition()
        self._heap: list[tuple[int, int, ReadJob]] = []
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, args=(i,), name=f"ws-reader-{i}", daemon=True)
                         for i in range(n_threads)]
        for t in self._threads:
            t.start()

    @property
    def n_threads(self) -> int:
        return len(self._threads)

    # ---- the consumer's side (never with cv held: it is not re-entrant) ----
    def submit(self, job: ReadJob) -> None:
        with self.cv:
            if self._closed:
                raise RuntimeError("ReadPool is closed")
            job.state, job.t_queued = QUEUED, time.perf_counter()
            self._push(job)
            self.cv.notify_all()

    def promote(self, job: ReadJob) -> None:
        """Serve a queued prefetch as a demand read (its layer now needs it)."""
        with self.cv:
            if job.state == QUEUED and job.priority != DEMAND:
                job.priority = DEMAND
                self._push(job)  # the old heap entry goes stale
                self.cv.notify_all()

    def cancel(self, job: ReadJob) -> bool:
        """Drop a job that has not started. False if a reader already has it."""
        with self.cv:
            if job.state != QUEUED:
                return False
            job.state = CANCELLED
            self.cv.notify_all()
            return True

    def _push(self, job: ReadJob) -> None:
        job._seq = next(self._seq)
        heapq.heappush(self._heap, (job.priority, job._seq, job))

    # ---- the readers --------------------------------------------------------------------------
    def _next_job(self) -> ReadJob | None:
        with self.cv:
            while True:
                while self._heap:
                    _, seq, job = heapq.heappop(self._heap)
                    if job.state == QUEUED and job._seq == seq:
                        job.state = RUNNING
                        return job
                if self._closed:
                    return None
                self.cv.wait()  # idle until work comes: submit() and close() notify, no timeout needed

    def _serve(self, index: int) -> None:
        while (job := self._next_job()) is not None:
            job.thread, job.t_start = index, time.perf_counter()
            try:
                self._read(job)
                for path in {r.path for r in job.ranges}:  # bytes of a file changed meanwhile: an error
                    self.identities[path].check(self._fds[path], f"(reading {job.ranges[0].what})")
                if job.check is not None:
                    job.check(job)
            except BaseException as e:  # handed to the consumer, which raises it
                job.error = e
            job.t_end = time.perf_counter()
            with self.cv:
                job.state = DONE
                self.cv.notify_all()
            if self.on_done is not None:
                self.on_done(job)

    def _read(self, job: ReadJob) -> None:
        for r in job.ranges:
            fd = self._fds[r.path]
            done = 0
            while done < r.length:  # a pread may return less than asked without being at EOF
                try:
                    got = os.preadv(fd, [job.dest[r.pos + done:r.pos + r.length]], r.offset + done)
                except OSError as e:
                    raise ExpertReadError(e.errno, f"{r.path}: reading {r.what} at offset {r.offset + done} "
                                                   f"({r.length} bytes): {e.strerror}") from e
                if got == 0:
                    if done >= r.need:  # the widened tail past the end of the file
                        break
                    raise ExpertReadError(f"{r.path}: short read of {r.what} at offset {r.offset}: "
                                          f"{done} of {r.need} bytes (file truncated?)")
                done += got
            job.nbytes += done

    def close(self) -> None:
        with self.cv:
            if self._closed:
                return
            self._closed = True
            for _, _, job in self._heap:
                if job.state == QUEUED:
                    job.state = CANCELLED
            self._heap.clear()
            self.cv.notify_all()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stuck = [t.name for t in self._threads if t.is_alive()]
        if self.stuck:  # see the module docstring: left behind, their descriptors open
            warnings.warn(f"{', '.join(self._fds)}: reader thread(s) {', '.join(self.stuck)} still blocked in a "
                          f"read after {CLOSE_TIMEOUT_S:.0f} s; closing without them (the disk or filesystem is not "
                          f"answering)", RuntimeWarning, stacklevel=3)
            return
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def aligned_span(offset: int, length: int, direct: bool) -> tuple[int, int, int]:
    """(read offset, read length, head): the range to read so that O_DIRECT accepts it, and where
    the wanted bytes start within it. Buffered reads take the range as it is."""
    if not direct:
        return offset, length, 0
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    return start, end - start, offset - start


def region_bytes(length: int, direct: bool) -> int:
    """Slot bytes one range needs at any file offset (O_DIRECT: whole pages plus one for the head)."""
    return -(-length // ALIGN) * ALIGN + (ALIGN if direct else 0)
