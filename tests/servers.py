"""Loopback HTTP servers for tests: a plain file server and a minimal Hugging Face Hub.

Both listen on 127.0.0.1 on a free port, run in a daemon thread, record every request
and are used as context managers::

    with FileServer({"/w/fold0.pth": data}) as srv:
        url = srv.url("/w/fold0.pth")

    with HubServer() as hub:
        commit = hub.add_repo("org/name", {"config.json": b"{}"})
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse
from collections.abc import Mapping

__all__ = ["FileServer", "HubServer"]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    """Start/stop a handler class on 127.0.0.1 in a thread and record requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                owner._record("HEAD", self.path)
                owner.handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                owner._record("GET", self.path)
                owner.handle(self, head=False)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def handle(self, req: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        self._send(req, 500, b"no handler", {}, head)

    def __enter__(self):  # noqa: ANN204
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @staticmethod
    def _send(req: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str], head: bool) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


class FileServer(_Base):
    """Serve fixed bytes at fixed paths; everything else is 404.

    Attributes:
        files: path -> bytes (mutable while running).
        truncate: path -> number of bytes actually sent (the Content-Length stays
            the full size, simulating a dropped connection).
    """

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        super().__init__()
        self.files: dict[str, bytes] = dict(files or {})
        self.truncate: dict[str, int] = {}

    def url(self, path: str) -> str:
        """Full URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def handle(self, req: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.urlsplit(req.path).path
        body = self.files.get(path)
        if body is None:
            self._send(req, 404, b"not found", {"Content-Type": "text/plain"}, head)
            return
        cut = self.truncate.get(path)
        if cut is not None and not head:
            req.send_response(200)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body[:cut])
            req.wfile.flush()
            req.close_connection = True
            return
        self._send(req, 200, body, {"Content-Type": "application/octet-stream"}, head)

    def gets(self, path: str) -> int:
        """How many GET requests ``path`` received."""
        return sum(1 for method, p in self.requests if method == "GET" and urllib.parse.urlsplit(p).path == path)


class HubServer(_Base):
    """The file-resolution part of the Hub protocol (REFERENCE §5).

    ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` answer with
    ``X-Repo-Commit`` and ``ETag``; unknown repositories, revisions and files answer
    404 with ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or
    ``EntryNotFound``.
    """

    def __init__(self) -> None:
        super().__init__()
        # repo_id -> {commit: {filename: bytes}}, and repo_id -> {branch/tag: commit}
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], *, revision: str = "main") -> str:
        """Publish ``files`` as a new commit on ``revision`` of ``repo_id``; returns the commit."""
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for name in sorted(files):
            digest.update(name.encode() + files[name])
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[commit] = dict(files)
        self.refs.setdefault(repo_id, {})[revision] = commit
        return commit

    def file_gets(self) -> int:
        """How many GET requests for files the server answered."""
        return sum(1 for method, p in self.requests if method == "GET" and "/resolve/" in p)

    def handle(self, req: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self._send(req, 404, b"{}", {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head)
            return
        repo_id = "/".join(parts[:2])
        revision = parts[3]
        filename = "/".join(parts[4:])
        if repo_id not in self.repos:
            self._send(req, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head)
            return
        commit = self.refs[repo_id].get(revision, revision)
        files = self.repos[repo_id].get(commit)
        if files is None:
            self._send(req, 404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound", "Content-Type": "application/json"}, head)
            return
        body = files.get(filename)
        if body is None:
            self._send(req, 404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit, "Content-Type": "application/json"}, head)
            return
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        self._send(req, 200, body, {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"}, head)
