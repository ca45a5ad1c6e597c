"""`weightstream bench io` (engine/stream/disk.py) on a small scratch file: it reads as many whole
chunks as asked and reports a bandwidth (the figure itself is not asserted)."""
import os

import numpy as np
import pytest

from weightstream.engine.stream.disk import disk_bandwidth, drop_cached_pages, make_scratch_file
from weightstream.engine.cli.main import main


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return make_scratch_file(tmp_path_factory.mktemp("io") / "scratch.bin", 8 << 20)


def test_scratch_file_is_complete_and_random(scratch):
    data = np.fromfile(scratch, dtype=np.uint8)
    assert len(data) == 8 << 20 and not (scratch.parent / "scratch.bin.tmp").exists()
    assert 120 < data.mean() < 135  # random bytes, not zeros


@pytest.mark.parametrize("threads", [1, 3])
def test_reads_every_requested_chunk_once(scratch, threads):
    r = disk_bandwidth(scratch, chunk_bytes=256 << 10, threads=threads, n_reads=20)
    assert r["reads"] == 20 and r["bytes"] == 20 * (256 << 10)
    assert r["bytes_per_s"] > 0 and r["latency_ms"][50] <= r["latency_ms"][99]


def test_too_small_file_is_refused(scratch):
    with pytest.raises(ValueError, match="smaller than one chunk"):
        disk_bandwidth(scratch, chunk_bytes=16 << 20)


def test_drop_cached_pages_runs_without_root(scratch):
    drop_cached_pages(scratch)  # posix_fadvise works for any reader of the file
    assert os.path.getsize(scratch) == 8 << 20


def test_cli(scratch, capsys):
    assert main(["bench", "io", str(scratch), "--chunk-mib", "0.5", "--threads", "1,2", "--reads", "8"]) == 0
    out = capsys.readouterr().out
    assert "| 0.50 MiB | 1 | 8 |" in out and "| 0.50 MiB | 2 | 8 |" in out
