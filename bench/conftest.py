"""Fixtures for the pytest-benchmark suites: the machine's bandwidth, measured once per session,
is the yardstick every kernel figure is reported against (DESIGN.md, habit 8)."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bandwidth() -> dict[int, float]:
    """{threads: memory read bytes/s} for 1 and 2 threads."""
    from weightstream.kernels.bench import memory_bandwidth

    return {t: memory_bandwidth(t, size_bytes=512 << 20, repeats=10) for t in (1, 2)}


@pytest.fixture(scope="session")
def demo_model():
    from weightstream.engine.tools.assets import demo_model_path

    try:
        return demo_model_path(quiet=True)
    except RuntimeError as e:  # offline and not cached
        pytest.skip(f"demo model unavailable: {e}")
