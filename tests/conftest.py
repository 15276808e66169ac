"""Shared fixtures: every cache redirected to a temporary directory, a clean environment per test."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("HF_HUB_OFFLINE", None)  # huggingface_hub reads it once, at import: start online
os.environ.pop("HF_ENDPOINT", None)

import huggingface_hub.constants  # noqa: E402,F401  (import now, with the environment above)


@pytest.fixture
def _cache_root(tmp_path_factory):
    """A fresh cache folder, deleted after the test (converted models are 134 MB each: pytest would
    keep them for its last 3 runs). Set up before ``monkeypatch``, so torn down after its undo."""
    root = tmp_path_factory.mktemp("cache")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_caches(_cache_root, monkeypatch):
    """Point every cache (ours and the Hub's) at a fresh temporary directory."""
    root = _cache_root
    monkeypatch.setenv("ANATCL_CACHE", str(root / "anatcl"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("ANATCL_OFFLINE", "ANATCL_HUB_REPO", "HF_HUB_OFFLINE", "HF_ENDPOINT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield root


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """The CLI configures the package logger; give every test the default one back."""
    logger = logging.getLogger("anatcl_infer")

    def reset() -> None:  # not the state found: a module-scoped fixture may have run the CLI before it
        logger.handlers[:], logger.level, logger.propagate = [], logging.NOTSET, True

    reset()
    yield
    reset()
