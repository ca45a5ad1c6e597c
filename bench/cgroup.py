"""Run a command inside a memory cgroup (v1) whose limit counts the process and its page cache.

This is how a test or a benchmark proves that a model larger than memory really runs: the kernel
will not let the child's anonymous memory plus the file pages it brings in exceed the limit
(page cache is reclaimed first; anonymous memory over the limit gets the child OOM-killed).

    with MemoryCgroup(limit_bytes) as cg:            # needs root and the v1 memory controller
        result = cg.run([sys.executable, "-c", ...])  # CompletedProcess, + cg.peak_bytes, cg.oom_kills

A child cgroup is made under the cgroup this process is in (so the caller's own limits still
apply), and removed afterwards. `cgroup_unavailable()` says why one cannot be made, for a skip.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def _own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_ROOT / path.lstrip("/")
    return MEMORY_ROOT


def cgroup_unavailable() -> str | None:
    """None if a memory cgroup can be made here, else the reason."""
    if not (MEMORY_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {MEMORY_ROOT}"
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    parent = _own_memory_cgroup()
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"cannot create a cgroup under {parent}"
    return None


class MemoryCgroup:
    def __init__(self, limit_bytes: int, name: str | None = None):
        reason = cgroup_unavailable()
        if reason:
            raise RuntimeError(f"MemoryCgroup: {reason}")
        self.limit_bytes = int(limit_bytes)
        self.path = _own_memory_cgroup() / (name or f"weightstream-{os.getpid()}-{id(self) & 0xffff:x}")
        self.peak_bytes = 0
        self.oom_kills = 0

    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        try:
            (self.path / "memory.swappiness").write_text("0")
        except OSError:
            pass  # not settable on every kernel; there is no swap here anyway
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        return self

    def run(self, argv, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run argv with the child placed in this cgroup before it executes anything."""
        procs = str(self.path / "cgroup.procs")

        def enter():  # in the child, between fork and exec
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

        try:
            return subprocess.run(argv, preexec_fn=enter, timeout=timeout, **kwargs)
        finally:
            self.peak_bytes = int((self.path / "memory.max_usage_in_bytes").read_text())
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    self.oom_kills = int(line.split()[1])

    def __exit__(self, *exc) -> None:
        try:
            (self.path / "memory.force_empty").write_text("0")  # uncharge its page cache first
        except OSError:
            pass
        self.path.rmdir()
