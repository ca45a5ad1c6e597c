"""Writing a file so that readers see the old one or the whole new one, never a part.

    with replacing(path) as tmp:     # a temporary name beside path; renamed onto it on success,
        write(tmp)                   # removed on failure
    write_json(path, obj, indent=1)  # the same for a JSON document

    with gguf_output(path, arch) as (writer, tmp):   # a GGUFWriter on a temporary name, the same way

Every writer of the project (synth, quantize, convert, imatrix, the profiler's reports) goes
through these two, so each of them:
- fsyncs the temporary file before the rename and the directory after it: a crash or power cut
  leaves the old file or the whole new one, never a renamed file whose data never reached the disk;
- removes the temporary file on any failure, including SIGTERM (what `timeout`, systemd and docker
  send) and SIGINT: for the duration of the write (in the main thread: Python runs signal handlers
  there only) SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, so the cleanup below
  runs; the previous handlers are restored after. A signal set to be ignored stays ignored.
  SIGKILL cannot be caught: it leaves the hidden temporary (".NAME.*.tmp") behind.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import gguf

CAUGHT = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def interrupts_raise():
    """For the block (main thread only): SIGTERM raises SystemExit(128 + SIGTERM), SIGINT
    KeyboardInterrupt, once: a second signal while the first one's cleanup runs is ignored, so it
    cannot cut the cleanup short. Previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal works only in the main thread, which is where Python delivers them
        return
    raised = []

    def handler(signum, frame):
        if raised:
            return
        raised.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for sig in CAUGHT:
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:  # ignored on purpose (nohup, a supervisor): keep it so
            continue
        previous[sig] = signal.SIG_DFL if old is None else old  # None: set outside Python
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fsync_path(path, directory: bool = False) -> None:
    """fsync a file (its data and size) or a directory (its entries: a rename) by name."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp, path: Path) -> None:
    """fsync tmp, rename it onto path, fsync the directory: the rename is durable and publishes
    only bytes already on disk."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent, directory=True)


@contextmanager
def replacing(path):
    """Yield a temporary path next to `path`; on success move it onto `path` (durably), on failure
    or a signal remove it."""
    path = Path(path)
    with interrupts_raise():  # installed before the temporary exists: no window where a signal leaves it
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            yield tmp
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; what we write is an ordinary file
            _publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path, obj, **kw) -> Path:
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    return path


@contextmanager
def gguf_output(out_path: Path, arch: str):
    """(GGUFWriter, its path): a writer on a temporary name beside out_path, renamed onto out_path
    (durably) when the block completes and removed if it raises or a signal comes, so no reader
    ever sees a half-written model. The block writes the header to the path it is given."""
    out_path = Path(out_path)
    tmp_path = out_path.with_name(f".{out_path.name}.{secrets.token_hex(4)}.tmp")
    with interrupts_raise():
        writer = gguf.GGUFWriter(tmp_path, arch)
        try:
            yield writer, tmp_path
            writer.close()
            _publish(tmp_path, out_path)
        except BaseException:
            writer.close()
            tmp_path.unlink(missing_ok=True)
            raise
