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


class _Misbehaving:
    """A loopback server whose body stalls, drips or never ends (what the FileServer cannot do)."""

    def __init__(self, mode: str, length: int | None = None) -> None:
        import http.server
        import threading
        import time

        self.mode, self.stop = mode, threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    if outer.mode == "stall":  # half the body, then silence
                        self.wfile.write(b"x" * 1000)
                        self.wfile.flush()
                        outer.stop.wait(30)
                    elif outer.mode == "drip":  # one byte every 0.2 s, for ever
                        while not outer.stop.is_set():
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    elif outer.mode == "endless":  # fast, never ends
                        chunk = b"x" * (1 << 16)
                        while not outer.stop.is_set():
                            self.wfile.write(chunk)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/f.pth"

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_server_stalling_mid_body_ends_within_the_timeout(tmp_path):
    import time

    with _Misbehaving("stall", length=5000) as url:
        started = time.monotonic()
        with pytest.raises(DownloadError, match="broke off after 1000 bytes"):
            download_url(url, tmp_path / "f.pth", timeout=1.0)
        assert time.monotonic() - started < 10
    assert _leftovers(tmp_path) == []


def test_a_dripping_body_hits_the_deadline(tmp_path):
    import time

    with _Misbehaving("drip") as url:  # each read succeeds within the socket timeout
        started = time.monotonic()
        with pytest.raises(DownloadError, match="took more than 2 s"):
            download_url(url, tmp_path / "f.pth", timeout=5.0, deadline=2.0)
        assert time.monotonic() - started < 8
    assert _leftovers(tmp_path) == []


def test_an_endless_body_is_capped(tmp_path):
    with _Misbehaving("endless") as url:
        with pytest.raises(DownloadError, match="more than the 3000000 bytes expected"):
            download_url(url, tmp_path / "f.pth", max_bytes=3_000_000)
    with _Misbehaving("endless", length=10**12) as url:  # announced too big: refused before reading
        with pytest.raises(DownloadError, match="announces 1000000000000 bytes"):
            download_url(url, tmp_path / "f.pth")
    assert _leftovers(tmp_path) == []


def test_the_manifest_size_is_enforced(server, tmp_path):
    with pytest.raises(DownloadError, match="more than the 1000 expected"):
        download_url(server.url("/f.bin"), tmp_path / "f.bin", size=1000)
    assert download_url(server.url("/f.bin"), tmp_path / "f.bin", size=len(BODY)) == BODY_SHA


def test_downloads_get_the_umask_mode(server, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        download_url(server.url("/f.bin"), tmp_path / "shared" / "f.bin")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "shared" / "f.bin").stat().st_mode)
    assert mode == 0o644, oct(mode)


def test_hub_lookup_fails_at_once_when_the_host_is_unreachable(monkeypatch):
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(DownloadError, match="cannot reach the Hub.*refused"):
        download.hf_download("org/model", ("config.json",))
    assert time.monotonic() - started < 5  # huggingface_hub alone retries for ~25 s


def test_hints_name_the_model_and_fold_asked_for():
    assert "anatcl download anatcl-local --fold 3" in download.prefetch_hint("anatcl-local", 3)
    assert "anatcl download all --fold all" in download.offline_hint("all", "all")
