"""Writing a file so that readers see the old one or the whole new one, never a part.

    with replacing(path) as tmp:     # a temporary name beside path; renamed onto it on success,
        write(tmp)                   # removed on failure
    write_json(path, obj, indent=1)  # the same for a JSON document

(GGUF writers use engine/tools/convert.py's gguf_output, which also fsyncs the data.)
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
