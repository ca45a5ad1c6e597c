"""Writing a file so that readers see the old one or the whole new one, never a part.

    with replacing(path) as tmp:     # a temporary name beside path; renamed onto it on success,
        write(tmp)                   # removed on failure
    write_json(path, obj, indent=1)  # the same for a JSON document

    with gguf_output(path, arch) as (writer, tmp):   # a GGUFWriter on a temporary name, the same way
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path

import gguf


@contextmanager
def replacing(path):
    """Yield a temporary path next to `path`; on success move it onto `path`, on failure remove it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; what we write is an ordinary file
        os.replace(tmp, path)
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
    when the block completes and removed if it raises, so no reader ever sees a half-written
    model. The block writes the header to the path it is given."""
    tmp_path = out_path.with_name(f".{out_path.name}.{secrets.token_hex(4)}.tmp")
    writer = gguf.GGUFWriter(tmp_path, arch)
    try:
        yield writer, tmp_path
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
