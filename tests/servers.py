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

import base64
import hashlib
import http.server
import json
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

            def do_POST(self) -> None:  # noqa: N802
                owner._record("POST", self.path)
                length = int(self.headers.get("Content-Length") or 0)
                owner.handle_post(self, self.rfile.read(length) if length else b"")

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def handle(self, req: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        self._send(req, 500, b"no handler", {}, head)

    def handle_post(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        self._send(req, 405, b"no POST here", {}, False)

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

    Uploads with ``HfApi`` work too (``create_repo``, ``create_branch``, ``upload_folder``):
    ``POST /api/repos/create``, ``/api/models/{repo}/branch/{b}``, ``/api/validate-yaml``,
    ``/api/models/{repo}/preupload/{rev}`` (every file "regular") and
    ``/api/models/{repo}/commit/{rev}`` (NDJSON, base64 contents) make a new commit on top of the
    branch. ``posts`` keeps (path, JSON body or NDJSON lines, Authorization header) of each.
    """

    def __init__(self) -> None:
        super().__init__()
        # repo_id -> {commit: {filename: bytes}}, and repo_id -> {branch/tag: commit}
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.posts: list[tuple[str, object, str | None]] = []
        self._etags: dict[tuple[str, str, str], str] = {}

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
        key = (repo_id, commit, filename)
        if key not in self._etags:  # hashing a 130 MB model once, not on every request
            self._etags[key] = '"' + hashlib.sha256(body).hexdigest() + '"'
        etag = self._etags[key]
        self._send(req, 200, body, {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"}, head)

    def handle_post(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        auth = req.headers.get("Authorization")
        try:
            payload: object = json.loads(body) if body else {}
        except ValueError:
            payload = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.posts.append((path, payload, auth))

        def reply(status: int, data: object, code: str | None = None) -> None:
            headers = {"Content-Type": "application/json", **({"X-Error-Code": code} if code else {})}
            self._send(req, status, json.dumps(data).encode(), headers, False)

        if path == "/api/validate-yaml":
            return reply(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            assert isinstance(payload, dict)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.repos:
                return reply(409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"})
            self.repos[repo_id] = {}
            self.refs[repo_id] = {}
            return reply(200, {"url": f"{self.endpoint}/{repo_id}"})
        parts = path.strip("/").split("/")
        if len(parts) < 6 or parts[:2] != ["api", "models"]:
            return reply(404, {"error": "not found"}, "RepoNotFound")
        repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
        if repo_id not in self.repos:
            return reply(404, {"error": "Repository not found"}, "RepoNotFound")
        if action == "branch":
            if revision in self.refs[repo_id]:
                return reply(409, {"error": "branch exists"})
            base = self.refs[repo_id].get("main")
            self.add_repo(repo_id, self.repos[repo_id].get(base, {}) if base else {}, revision=revision)
            return reply(200, {})
        if action == "preupload":
            assert isinstance(payload, dict)
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in payload["files"]]
            return reply(200, {"files": files})
        if action == "commit":
            assert isinstance(payload, list)
            base = self.refs[repo_id].get(revision)
            files = dict(self.repos[repo_id].get(base, {})) if base else {}
            for item in payload:
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            commit = self.add_repo(repo_id, files, revision=revision)
            return reply(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit}", "commitOid": commit, "pullRequestUrl": None})
        return reply(404, {"error": "not found"}, "EntryNotFound")
