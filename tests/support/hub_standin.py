"""A stand-in for the Hugging Face Hub: a small HTTP server on 127.0.0.1 that speaks the part of
the Hub's API that huggingface_hub uses, serving one private repository that needs the bearer token.

Real on the client side: huggingface_hub (its HTTP client, revision resolution, tree listing,
downloads, `HF_ENDPOINT` and `HF_TOKEN` handling). Emulated: the Hub itself —
`/api/models/{repo}/revision/{rev}`, `/api/models/{repo}/tree/{commit}`,
`HEAD`/`GET /{repo}/resolve/{commit}/{file}`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class HubRepo:
    name: str
    """ORG/NAME."""
    commit: str
    files: dict[str, bytes]
    token: str
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""


class _Hub(BaseHTTPRequestHandler):
    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _route(self) -> None:
        repo: HubRepo = self.server.repo  # type: ignore[attr-defined]
        name, commit = repo.name, repo.commit
        path = unquote(urlsplit(self.path).path)
        repo.requests.append((self.command, path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") != f"Bearer {repo.token}":
            # What the Hub answers for a private repository without a valid token.
            self._send(401, b'{"error":"Invalid credentials"}', {"X-Error-Code": "RepoNotFound"})
            return
        if path in (f"/api/models/{name}/revision/main", f"/api/models/{name}/revision/{commit}"):
            siblings = [{"rfilename": n} for n in sorted(repo.files)]
            self._json({"id": name, "sha": commit, "siblings": siblings, "private": True})
        elif path == f"/api/models/{name}/tree/{commit}":
            self._json(
                [
                    {
                        "type": "file",
                        "path": n,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }
                    for n, data in sorted(repo.files.items())
                ]
            )
        elif path.startswith(f"/{name}/resolve/{commit}/"):
            data = repo.files.get(path.removeprefix(f"/{name}/resolve/{commit}/"))
            if data is None:
                self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                return
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag})
        else:
            self._send(404, b"", {"X-Error-Code": "RevisionNotFound"})

    do_GET = do_HEAD = _route

    def log_message(self, *args: Any) -> None:
        pass


class HubStandin:
    """The server, started by `start()` and stopped by `stop()`; `url` is its HF_ENDPOINT."""

    def __init__(self, repo: HubRepo) -> None:
        self.repo = repo
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
        self._server.repo = repo  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandin:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
