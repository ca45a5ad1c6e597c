"""The disk's raw read bandwidth for expert-sized chunks: the ceiling the expert streamer is judged
against (`weightstream bench io`).

A routed expert is one read of a few MiB at a scattered offset, so the figure that matters is
parallel cold preads of that size at random chunk-aligned offsets, not a sequential copy. The
file's pages are dropped from the page cache first (posix_fadvise DONTNEED on the file: no root
needed; with root, --drop-all empties the whole page cache as /proc/sys/vm/drop_caches does), so
the reads come from the device. os.preadv releases the GIL and fills buffers allocated once.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..formats.atomic import replacing

EXPERT_CHUNK = 3 * 4096 * 1536 * 84 // 256  # one Q2_K expert of 4096 <-> 1536 (gate, up, down): 6.2 MB


def drop_cached_pages(path: Path, everything: bool = False) -> None:
    """Evict `path` from the page cache (and, with everything=True and root, all clean pages)."""
    if everything:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped: write them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(path, chunk_bytes: int = EXPERT_CHUNK, threads: int = 2, n_reads: int | None = None,
                   seed: int = 0, cold: bool = True, drop_all: bool = False) -> dict:
    """Read n_reads chunks of chunk_bytes at random chunk-aligned offsets of `path` with `threads`
    reader threads; {bytes_per_s, reads, bytes, seconds, latency_ms percentiles, ...}. Each
    offset is read once (no read can hit a page another one brought in)."""
    path = Path(path)
    size = path.stat().st_size
    if chunk_bytes < 1 or threads < 1:
        raise ValueError(f"disk_bandwidth: chunk_bytes and threads must be >= 1, got {chunk_bytes}, {threads}")
    n_chunks = size // chunk_bytes
    if n_chunks < 1:
        raise ValueError(f"disk_bandwidth: {path} ({size} bytes) is smaller than one chunk of {chunk_bytes} bytes")
    n_reads = min(n_reads or n_chunks, n_chunks)
    offsets = np.random.default_rng(seed).permutation(n_chunks)[:n_reads] * chunk_bytes
    buffers = [bytearray(chunk_bytes) for _ in range(threads)]  # one per reader, reused
    latencies = np.zeros(n_reads)  # seconds per read, by read index
    if cold:
        drop_cached_pages(path, drop_all)
    fd = os.open(path, os.O_RDONLY)
    try:
        def reader(worker: int) -> int:
            got, buf = 0, buffers[worker]
            for i in range(worker, n_reads, threads):  # reads interleaved over the workers
                t0 = time.perf_counter()
                n = os.preadv(fd, [buf], int(offsets[i]))
                latencies[i] = time.perf_counter() - t0
                if n != chunk_bytes:
                    raise OSError(f"{path}: short read at offset {int(offsets[i])}: {n} of {chunk_bytes} bytes")
                got += n
            return got

        t0 = time.perf_counter()
        # no timeout: a disk benchmark (`weightstream bench io`) run on purpose, its reads plain
        # preads that a dead disk fails with EIO; Ctrl-C still ends the command
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(reader, range(threads)))
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    lat_ms = latencies * 1e3
    return {"path": str(path), "file_bytes": size, "chunk_bytes": chunk_bytes, "threads": threads,
            "reads": n_reads, "bytes": total, "seconds": seconds, "bytes_per_s": total / seconds,
            "cold": cold, "latency_ms": {p: float(np.percentile(lat_ms, p)) for p in (50, 90, 99)}}


def make_scratch_file(path, size_bytes: int, block: int = 64 << 20) -> Path:
    """A file of random bytes (incompressible, so no filesystem shortcut), written to a temporary
    name and renamed when complete (engine/formats/atomic.py)."""
    path = Path(path)
    rng = np.random.default_rng(0)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        left = size_bytes
        while left > 0:
            n = min(block, left)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return path


def format_io(results: list[dict]) -> str:
    lines = ["| chunk | threads | reads | GB/s | p50 ms | p90 ms | p99 ms | cold |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lat = r["latency_ms"]
        lines.append(f"| {r['chunk_bytes'] / 2**20:.2f} MiB | {r['threads']} | {r['reads']} | {r['bytes_per_s'] / 1e9:.2f} | "
                     f"{lat[50]:.2f} | {lat[90]:.2f} | {lat[99]:.2f} | {'yes' if r['cold'] else 'no'} |")
    return "\n".join(lines)
