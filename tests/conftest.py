"""Shared fixtures: every cache redirected to a temporary directory, small real anatomy."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Point every cache (ours and the Hub's) at a fresh temporary directory."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ANATCL_CACHE", str(root / "anatcl"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("ANATCL_OFFLINE", raising=False)
    monkeypatch.delenv("ANATCL_HUB_REPO", raising=False)
    yield root
