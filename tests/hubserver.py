"""A local HTTP server that speaks the part of the HF hub protocol huggingface_hub downloads use.

Tests point ``HF_ENDPOINT`` at it, so the real download code (hf_hub_download, snapshot_download) runs
unchanged against small files the tests make. It can inject faults: serve corrupt bytes, or cut a
response half-way, a given number of times per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|models)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/(?P<type>datasets|models)/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)


@dataclass
class HubState:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)  # file name -> times to serve flipped bytes
    truncate: dict[str, int] = field(default_factory=dict)  # file name -> times to cut the body half-way
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes], **kw) -> Repo:
        repo = Repo(files=dict(files), **kw)
        self.repos[(repo_type, repo_id)] = repo
        return repo


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _json(self, payload, status=200):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _lookup(self, repo_type, repo_id, rev):
            repo = state.repos.get((repo_type, repo_id))
            if repo is None or (rev not in repo.branches and rev != repo.commit):
                return None
            return repo

        def _not_found(self, what):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if "file" in what else "RepositoryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _api(self, m):
            repo_type = m["type"][:-1]
            repo = self._lookup(repo_type, m["repo"], unquote(m["rev"]))
            if repo is None:
                return self._not_found("repo")
            if m["kind"] == "revision":
                return self._json(
                    {"id": m["repo"], "sha": repo.commit, "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
                )
            entries = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                    "lfs": {"oid": _sha256(data), "size": len(data), "pointerSize": 134},
                }
                for name, data in sorted(repo.files.items())
            ]
            return self._json(entries)

        def _resolve(self, m):
            repo_type = (m["type"] or "models")[:-1]
            repo = self._lookup(repo_type, m["repo"], unquote(m["rev"]))
            name = unquote(m["path"])
            if repo is None:
                return self._not_found("repo")
            if name not in repo.files:
                return self._not_found("file")
            data = repo.files[name]
            start = 0
            rng = self.headers.get("Range")
            if rng and (rm := re.match(r"bytes=(\d+)-", rng)):
                start = int(rm.group(1))
            payload = data[start:]
            if self.command == "GET" and state.corrupt.get(name, 0) > 0:
                state.corrupt[name] -= 1
                payload = bytes(b ^ 0xFF for b in payload)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{_sha256(data)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(payload)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if state.truncate.get(name, 0) > 0:
                state.truncate[name] -= 1
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

        def _route(self):
            path = urlparse(self.path).path
            state.requests.append((self.command, path, self.headers.get("Range")))
            if m := _API.match(path):
                return self._api(m)
            if m := _RESOLVE.match(path):
                return self._resolve(m)
            return self._not_found("repo")

        do_GET = _route
        do_HEAD = _route

    return Handler


class HubServer:
    """Run :class:`HubState` on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(self, state: HubState | None = None):
        self.state = state or HubState()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        # shutdown() waits for serve_forever's next poll: 0.05 s, not the default 0.5 s, at every test's end
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that downloads from this server (HF_ENDPOINT, no progress bars, a short
        ETag timeout, online), plus ``extra``."""
        env = dict(os.environ, HF_ENDPOINT=self.url, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5", **extra)
        env.pop("HF_HUB_OFFLINE", None)
        return env

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
