"""A stand-in for the Hugging Face Hub: a small HTTP server on 127.0.0.1 that speaks the part of
the Hub's API that huggingface_hub uses, serving model and dataset repositories (private ones need
the bearer token) and accepting commits.

Real on the client side: huggingface_hub (its HTTP client, revision resolution, tree listing,
downloads, uploads, `HF_ENDPOINT` and `HF_TOKEN` handling). Emulated: the Hub itself —

* reads: `/api/{models,datasets}/{repo}/revision/{rev}`, `/api/{…}/tree/{commit}[/path]`,
  `HEAD`/`GET /{repo}/resolve/{commit}/{file}` (models), `/datasets/{repo}/resolve/{commit}/{file}`;
* writes: `POST /api/repos/create`, `POST /api/validate-yaml`, `POST /api/models/{repo}/preupload/
  {rev}` (every file "regular": the test models are small, so their content goes inline in the
  commit), `POST /api/models/{repo}/commit/{rev}` (NDJSON, base64 contents), which moves the
  branch to a new commit.

`HubRepo.fail` queues HTTP statuses the next write requests answer instead (a Hub that refuses
once); every request is logged in `HubRepo.requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

Kind = Literal["models", "datasets"]


def sha_of(files: dict[str, bytes], parent: str = "") -> str:
    """A commit sha from the tree's content and its parent (deterministic, 40 hex)."""
    digest = hashlib.sha1(parent.encode())
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha1(data).digest())
    return digest.hexdigest()


@dataclass
class HubRepo:
    """One repository: commits (sha → files), refs (branch or tag → sha), who may read it."""

    name: str
    """ORG/NAME."""
    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    token: str | None
    """The bearer token every request must carry; None: a public repository (reads only)."""
    kind: Kind = "models"
    messages: dict[str, str] = field(default_factory=dict)
    """Commit sha → the commit message of pushed commits."""

    @classmethod
    def of(
        cls, name: str, files: dict[str, bytes], token: str | None, kind: Kind = "models"
    ) -> HubRepo:
        commit = sha_of(files)
        return cls(
            name=name, commits={commit: files}, refs={"main": commit}, token=token, kind=kind
        )

    @property
    def commit(self) -> str:
        return self.refs["main"]

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[self.commit]

    def push(self, files: dict[str, bytes], ref: str = "main", message: str = "") -> str:
        """A new commit of `files` over the ref's, the ref moved to it; its sha."""
        parent = self.refs.get(ref, "")
        tree = {**self.commits.get(parent, {}), **files}
        commit = sha_of(tree, parent)
        self.commits[commit] = tree
        self.refs[ref] = commit
        self.messages[commit] = message
        return commit

    def tree(self, revision: str) -> dict[str, bytes] | None:
        commit = self.refs.get(revision, revision)
        return self.commits.get(commit)


@dataclass
class Hub:
    """What the server serves and records."""

    repos: dict[tuple[Kind, str], HubRepo] = field(default_factory=dict)
    token: str = ""
    """The token writes need (creating repositories, commits)."""
    fail: list[int] = field(default_factory=list)
    """HTTP statuses the next write requests answer instead, first first."""
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""

    def add(self, repo: HubRepo) -> HubRepo:
        self.repos[(repo.kind, repo.name)] = repo
        return repo

    def downloads(self) -> list[str]:
        """The paths of the files fetched (GET …/resolve/…)."""
        return [p for method, p, _ in self.requests if method == "GET" and "/resolve/" in p]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> Hub:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _missing(self, code: str) -> None:
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

    def _authorized(self, token: str | None) -> bool:
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _find(self, kind: Kind, rest: str) -> tuple[HubRepo, str] | None:
        """The repository `rest` starts with (ORG/NAME/…), and what follows it."""
        for (k, name), repo in self.hub.repos.items():
            if k == kind and (rest == name or rest.startswith(name + "/")):
                return repo, rest[len(name) + 1 :]
        return None

    def _read(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
        kind: Kind = "datasets" if path.startswith(("/api/datasets/", "/datasets/")) else "models"
        api = path.startswith("/api/")
        rest = path.removeprefix("/api").removeprefix(f"/{kind}").removeprefix("/")
        found = self._find(kind, rest)
        if found is None or not self._authorized(found[0].token):
            # What the Hub answers for a missing repository, or a private one without the token.
            self._send(401, b'{"error":"Invalid credentials"}', {"X-Error-Code": "RepoNotFound"})
            return
        repo, rest = found
        action, _, rest = rest.partition("/")
        if api and action == "revision":
            files = repo.tree(rest)
            if files is None:
                self._missing("RevisionNotFound")
                return
            siblings = [{"rfilename": n} for n in sorted(files)]
            commit = repo.refs.get(rest, rest)
            self._json(
                {"id": repo.name, "sha": commit, "siblings": siblings, "private": bool(repo.token)}
            )
        elif api and action == "tree":
            commit, _, folder = rest.partition("/")
            files = repo.tree(commit)
            if files is None:
                self._missing("RevisionNotFound")
                return
            under = {
                n: d
                for n, d in files.items()
                if not folder or n.startswith(folder.rstrip("/") + "/")
            }
            self._json(
                [
                    {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in sorted(under.items())
                ]
            )
        elif not api and action == "resolve":
            commit, _, name = rest.partition("/")
            data = (repo.tree(commit) or {}).get(name)
            if data is None:
                self._missing("EntryNotFound")
                return
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._send(200, data, {"X-Repo-Commit": repo.refs.get(commit, commit), "ETag": etag})
        else:
            self._missing("RevisionNotFound")

    def _write(self) -> None:
        path = unquote(urlsplit(self.path).path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
        if not self._authorized(self.hub.token):
            self._send(401, b'{"error":"Invalid credentials"}', {"X-Error-Code": "RepoNotFound"})
            return
        if self.hub.fail:
            self._json({"error": "the stand-in refuses once"}, self.hub.fail.pop(0))
            return
        if path == "/api/repos/create":
            spec = json.loads(body)
            name = (
                f"{spec['organization']}/{spec['name']}"
                if spec.get("organization")
                else spec["name"]
            )
            kind: Kind = "datasets" if spec.get("type") == "dataset" else "models"
            if (kind, name) in self.hub.repos:
                self._json({"error": "You already created this model repo"}, 409)
                return
            repo = HubRepo(name=name, commits={}, refs={}, token=self.hub.token, kind=kind)
            self.hub.add(repo)
            self._json({"url": f"http://hub/{name}", "name": name})
        elif path == "/api/validate-yaml":
            self._json({"errors": [], "warnings": []})
        elif path.startswith("/api/models/"):
            found = self._find("models", path.removeprefix("/api/models/"))
            if found is None:
                self._missing("RepoNotFound")
                return
            repo, rest = found
            action, _, revision = rest.partition("/")
            if action == "preupload":
                files = json.loads(body)["files"]
                self._json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                    }
                )
            elif action == "commit":
                self._commit(repo, revision, body)
            else:
                self._missing("EntryNotFound")
        else:
            self._missing("EntryNotFound")

    def _commit(self, repo: HubRepo, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] != "file":
                continue
            value = line["value"]
            assert value["encoding"] == "base64", value
            files[value["path"]] = base64.b64decode(value["content"])
        message = header["summary"] + (
            "\n\n" + header["description"] if header.get("description") else ""
        )
        commit = repo.push(files, revision, message)
        self._json({"commitUrl": f"http://hub/{repo.name}/commit/{commit}", "commitOid": commit})

    do_GET = do_HEAD = _read
    do_POST = _write

    def log_message(self, *args: Any) -> None:
        pass


class HubStandin:
    """The server, started by `start()` and stopped by `stop()`; `url` is its HF_ENDPOINT."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = hub  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandin:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
