"""Cache location, offline switches and atomic, verified downloads over a loopback server."""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

import pytest

from anatcl_infer.weights import download
from anatcl_infer.weights.download import cache_dir, download_url, is_offline, sha256_file, verify_sha256
from anatcl_infer.errors import AnatCLError, DownloadError, IntegrityError, OfflineError
from servers import FileServer

BODY = bytes(range(256)) * 9000  # ~2.3 MB: several 1 MiB chunks
BODY_SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    with FileServer({"/f.bin": BODY}) as srv:
        yield srv


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_cache_dir_env_and_platform_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ANATCL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANATCL_CACHE")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "anatcl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "anatcl"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_dir() == Path.home() / "Library" / "Caches" / "anatcl"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "anatcl"


@pytest.mark.parametrize("var", ["ANATCL_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_switches(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not is_offline()
    monkeypatch.setenv(var, "1")
    assert is_offline()
    monkeypatch.setenv(var, "0")
    assert not is_offline()


def test_download_verifies_and_renames(server, tmp_path):
    dest = tmp_path / "d" / "f.bin"
    assert download_url(server.url("/f.bin"), dest, sha256=BODY_SHA.upper()) == BODY_SHA
    assert dest.read_bytes() == BODY
    assert _leftovers(dest.parent) == ["f.bin"]
    assert sha256_file(dest) == BODY_SHA == verify_sha256(dest, BODY_SHA)


def test_sha_mismatch_deletes_everything(server, tmp_path):
    dest = tmp_path / "d" / "f.bin"
    with pytest.raises(IntegrityError) as info:
        download_url(server.url("/f.bin"), dest, sha256="ab" * 32)
    assert info.value.actual == BODY_SHA and info.value.expected == "ab" * 32
    assert _leftovers(dest.parent) == []


def test_existing_file_survives_a_failed_download(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(IntegrityError):
        download_url(server.url("/f.bin"), dest, sha256="cd" * 32)
    assert dest.read_bytes() == b"old" and _leftovers(tmp_path) == ["f.bin"]


def test_truncated_transfer_leaves_no_partial_file(server, tmp_path):
    server.truncate["/f.bin"] = 1500000
    dest = tmp_path / "d" / "f.bin"
    with pytest.raises(DownloadError, match="try again"):
        download_url(server.url("/f.bin"), dest)
    assert _leftovers(dest.parent) == []


def test_http_error_and_unreachable(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_url(server.url("/missing.bin"), tmp_path / "x")
    assert info.value.url.endswith("/missing.bin") and isinstance(info.value, OSError)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot reach"):
        download_url(f"http://127.0.0.1:{port}/f.bin", tmp_path / "y", timeout=5)
    assert _leftovers(tmp_path) == []


def test_offline_never_touches_the_network(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    with pytest.raises(OfflineError, match="anatcl download") as info:
        download_url(server.url("/f.bin"), tmp_path / "f.bin")
    assert server.requests == []
    assert isinstance(info.value, AnatCLError) and isinstance(info.value, FileNotFoundError)


def test_verify_sha256_keeps_user_file(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(b"abc")
    with pytest.raises(IntegrityError, match="mine.pth"):
        verify_sha256(path, "00" * 32)
    assert path.exists()


def test_hub_cache_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert download._hub_cache_dir() == str(tmp_path / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert download._hub_cache_dir() == str(tmp_path / "home" / "hub")
