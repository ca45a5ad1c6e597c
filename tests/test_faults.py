"""Faults while a model runs (issue 16, items 3 and 8): a stuck read, a model file changed under a
running engine, NaN block scales in streamed experts. Each is a clear error or a bounded close
with a warning, never a hang, wrong text or a SIGBUS."""
import shutil
import threading
import time

import numpy as np
import pytest

from weightstream.engine import Engine
from weightstream.engine.errors import ExpertReadTimeout, ModelFileChangedError, NonFiniteWeightsError
from weightstream.engine.formats.gguf_file import GGUFFile
from weightstream.engine.stream import reader as expert_io
from weightstream.engine.stream.reader import CLOSE_TIMEOUT_S

IDS = [1, 504, 3458, 282, 4541, 314]  # a few tokens of the demo vocabulary
STREAM = dict(n_ctx=64, n_batch=8, stream="ffn", cache_slots=4, io="buffered", prefetch="routing")


@pytest.fixture
def model_copy(demo_model, tmp_path):
    """A copy of the demo model the test may rewrite."""
    return shutil.copyfile(demo_model, tmp_path / "model.gguf")


def _tensor_span(path, name):
    with GGUFFile(path) as f:
        info = f.info(name)
        return info.offset, info.nbytes


def _overwrite(path, name, byte, length=4096):
    offset, nbytes = _tensor_span(path, name)
    with open(path, "r+b") as fh:  # in place: same inode, new modification time
        fh.seek(offset)
        fh.write(bytes([byte]) * min(length, nbytes))


def _blocking_preadv(release: threading.Event):
    """os.preadv that never returns in a reader thread until `release` is set (a dead disk)."""
    real = expert_io.os.preadv

    def preadv(fd, buffers, offset):
        if threading.current_thread().name.startswith("ws-reader"):
            release.wait()
        return real(fd, buffers, offset)
    return preadv


def test_close_after_a_stuck_read_returns_in_bounded_time_with_a_warning(demo_model, monkeypatch):
    """The read timed out cleanly, then the with-exit joined the stuck reader for ever."""
    release = threading.Event()
    try:
        with pytest.raises(ExpertReadTimeout, match=r"no read of layer 0's experts \[0\] finished within"):
            with pytest.warns(RuntimeWarning, match=r"reader thread\(s\) ws-reader-\d.* still blocked in a read"):
                with Engine.load(demo_model, **STREAM) as eng:
                    eng.store.timeout_s = 0.5
                    monkeypatch.setattr(expert_io.os, "preadv", _blocking_preadv(release))
                    t0 = time.monotonic()
                    try:
                        eng.logits(IDS)
                    finally:
                        t1 = time.monotonic()
        t2 = time.monotonic()
        assert 0.5 <= t1 - t0 < 0.5 + 1.0
        assert t2 - t1 < CLOSE_TIMEOUT_S + 1.0  # the with-exit: close() gave up on the reader
    finally:
        release.set()  # the abandoned readers finish their reads into memory their jobs still hold


def test_an_engine_closed_while_another_thread_runs_a_forward_waits_then_warns(demo_model, monkeypatch):
    """close() does not unmap weights under a running forward pass, nor wait for ever."""
    release = threading.Event()
    eng = Engine.load(demo_model, **STREAM)
    monkeypatch.setattr(expert_io.os, "preadv", _blocking_preadv(release))
    done = []
    worker = threading.Thread(target=lambda: done.append(eng.logits(IDS)), name="ws-test-forward")
    worker.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="a forward pass in thread\\(s\\) ws-test-forward still runs after 1 s"):
        eng.close(timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert eng.file is not None and eng.store is not None  # left open for the running pass
    release.set()
    worker.join(10)  # bounded: the read returns now
    assert not worker.is_alive() and np.isfinite(done[0]).all()  # its pass ran on memory still mapped
    eng.close()  # the pass is over: now everything goes
    assert eng.file is None and eng.store is None


@pytest.mark.parametrize("change", ["zeros", "ff", "truncate"])
def test_streamed_experts_changed_under_the_engine_raise_model_file_changed(model_copy, change):
    """Zeros over an expert changed the text silently; 0xFF ended generation early, no error."""
    with Engine.load(model_copy, **STREAM) as eng:
        first = eng.logits(IDS)
        if change == "truncate":
            with open(model_copy, "r+b") as fh:
                fh.truncate(20 << 20)
        else:
            _overwrite(model_copy, "blk.3.ffn_up.weight", 0 if change == "zeros" else 0xFF)
        what = r"st_size 98362432 -> 20971520" if change == "truncate" else r"st_mtime_ns \d+ -> \d+"
        with pytest.raises(ModelFileChangedError, match=rf"model.gguf: the model file changed since it was loaded "
                                                        rf"\(.*{what}.*\) \(before a forward pass\)"):
            eng.logits(IDS)
        # the reader's own check (an engine-less store, or a file changed between two forward passes);
        # past the new end of the file the read itself fails first, as a short read
        eng._identities = []
        with pytest.raises(OSError, match=rf"model.gguf: (short read of blk\.\d+\.ffn_\w+\.weight expert 0|"
                                          rf"the model file changed .*{what}.* \(reading blk\.\d+\.ffn_\w+\.weight expert 0\))"):
            eng.logits(IDS)
    assert np.isfinite(first).all()


def test_streamed_experts_with_nan_scales_raise_naming_the_block(model_copy):
    """A file poisoned at rest (0xFF: NaN f16 scales) in a streamed FFN: a clear error at its read."""
    _overwrite(model_copy, "blk.2.ffn_down.weight", 0xFF, length=20 * 4096)
    with Engine.load(model_copy, **STREAM) as eng:
        with pytest.raises(NonFiniteWeightsError, match=r"model.gguf: blk\.2\.ffn_down\.weight expert 0: block 0 of "
                                                        r"\d+ has a NaN or infinite scale \(bits 0xffff\)"):
            eng.logits(IDS)
        # the bad expert was not cached: it is read, and refused, again
        with pytest.raises(NonFiniteWeightsError):
            eng.logits(IDS)


@pytest.mark.parametrize("change", ["zeros", "ff", "truncate", "replace"])
def test_a_resident_model_changed_before_a_call_raises_instead_of_sigbus(model_copy, change):
    """Truncating a memory-mapped model killed the process with SIGBUS at the next forward pass."""
    with Engine.load(model_copy, n_ctx=64) as eng:
        tokens = eng.generate_tokens(IDS, 4)
        next(tokens)
        if change == "truncate":
            with open(model_copy, "r+b") as fh:
                fh.truncate(20 << 20)
        elif change == "replace":
            tmp = model_copy.with_name("new.gguf")
            shutil.copyfile(model_copy, tmp)
            tmp.replace(model_copy)
        else:
            _overwrite(model_copy, "blk.0.attn_q.weight", 0 if change == "zeros" else 0xFF)
        what = {"truncate": "st_size 98362432 -> 20971520", "replace": "st_ino", "zeros": "st_mtime_ns",
                "ff": "st_mtime_ns"}[change]
        with pytest.raises(ModelFileChangedError, match=rf"model.gguf: .*\(.*{what}.*\) \(before a forward pass\)"):
            next(tokens)  # mid-generation
        with pytest.raises(ModelFileChangedError, match=what):
            eng.generate("Hello", 2)  # a new call
