"""LocalHub: a real HTTP server on 127.0.0.1 that stands in for the Hugging Face Hub in tests.

It implements the part of the Hub API that `huggingface_hub` (2.x) uses to create a repo, push a
folder and download it back, with the routes and headers read from the client's source:

    POST /api/repos/create                              create_repo (409 if it exists)
    POST /api/validate-yaml                             upload_folder checks README.md front matter
    POST /api/{type}s/{ns}/{name}/branch/{branch}       create_branch (409 if it exists)
    POST /api/{type}s/{ns}/{name}/preupload/{rev}       answers "uploadMode": "regular" for every file
    POST /api/{type}s/{ns}/{name}/commit/{rev}          NDJSON body, base64 file contents
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]      repo_info: sha, private, siblings
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]   list_repo_tree (snapshot_download lists files with it)
    GET|HEAD /[{type}s/]{ns}/{name}/resolve/{rev}/{path}  file bytes; ETag, X-Repo-Commit, Content-Length, Range

Everything is regular git content (no LFS, no Xet): blobs are stored under a temporary folder by
their git sha1, which is also what preupload reports as a file's "oid", so re-pushing an
unchanged file is skipped by the client exactly as on the real Hub.

Tests assert on `requests` (method, path and Authorization header of every request), `commits`
(message, branch, files of every commit), `repo(...)` (e.g. `.private`) and `files(...)`.
Failure knobs: `token=` requires `Authorization: Bearer <token>` on every request (401 otherwise),
`fail_with=` answers every request with that status, `delay_s=` sleeps before answering.

    with LocalHub(token="hf_test") as hub:
        HfApi(endpoint=hub.endpoint, token="hf_test").create_repo("me/model", exist_ok=True)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


@dataclass(frozen=True)
class CommitRecord:
    repo_id: str
    repo_type: str
    branch: str
    oid: str
    summary: str
    description: str
    paths: tuple[str, ...]
    """Files added or deleted by this commit."""


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    """Branch name -> head commit oid."""
    trees: dict[str, dict[str, str]] = field(default_factory=dict)
    """Commit oid -> {path in repo: blob sha1}."""


class HubHTTPError(Exception):
    """Raised by a route to answer with an error status, a JSON body and the Hub's error headers."""

    def __init__(
        self, status: int, message: str, *, error_code: str | None = None, repo_commit: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.repo_commit = repo_commit


class LocalHub:
    """A threaded HTTP Hub on 127.0.0.1 (free port), storing repos under a temporary folder."""

    def __init__(self, *, token: str | None = None, fail_with: int | None = None, delay_s: float = 0.0):
        self.token = token
        self.fail_with = fail_with
        self.delay_s = delay_s
        self.requests: list[RecordedRequest] = []
        self.commits: list[CommitRecord] = []
        self.validated_yaml: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._root: Path | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> LocalHub:
        self._root = Path(tempfile.mkdtemp(prefix="localhub-"))
        (self._root / "blobs").mkdir()
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="localhub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for connection in list(self._connections):
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._server = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running: use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what tests inspect -------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self._repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """{path: bytes} of every file of `repo_id` at `revision` (a branch or a commit oid)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            tree = dict(repo.trees[self._resolve(repo, revision)])
        return {path: self._read_blob(sha) for path, sha in tree.items()}

    def authorizations(self) -> set[str | None]:
        return {request.authorization for request in self.requests}

    # -- storage ------------------------------------------------------------------------------
    def _write_blob(self, content: bytes) -> str:
        sha = git_blob_sha1(content)
        path = self._root / "blobs" / sha
        if not path.exists():
            path.write_bytes(content)
        return sha

    def _read_blob(self, sha: str) -> bytes:
        return (self._root / "blobs" / sha).read_bytes()

    def _new_commit_oid(self, repo: Repo, parent: str | None, tree: dict[str, str], summary: str) -> str:
        self._commit_counter += 1
        payload = json.dumps(
            [repo.repo_type, repo.repo_id, parent, sorted(tree.items()), summary, self._commit_counter]
        )
        return hashlib.sha1(payload.encode()).hexdigest()

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubHTTPError(404, f"Repository not found: {repo_id}", error_code="RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.trees:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    # -- routes -------------------------------------------------------------------------------
    def create_repo(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name, organization = body.get("name"), body.get("organization")
        if not name or not organization:
            raise HubHTTPError(400, "LocalHub needs a namespaced repo id ('namespace/name')")
        repo_type = body.get("type") or "model"
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                return 409, {"error": f"You already created this {repo_type} repo", "url": url}
            repo = Repo(
                repo_id=repo_id,
                repo_type=repo_type,
                private=body.get("visibility") == "private" or body.get("private") is True,
            )
            tree = {".gitattributes": self._write_blob(GITATTRIBUTES)}
            oid = self._new_commit_oid(repo, None, tree, "initial commit")
            repo.trees[oid] = tree
            repo.branches["main"] = oid
            self._repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": oid}

    def validate_yaml(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        content = body.get("content", "")
        self.validated_yaml.append(content)
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match is None:
            return 200, {
                "errors": [],
                "warnings": [{"message": "empty or missing yaml metadata in repo card"}],
            }
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def create_branch(
        self, repo_type: str, repo_id: str, branch: str, body: dict[str, Any]
    ) -> tuple[int, Any]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if branch in repo.branches:
                return 409, {"error": f"Reference already exists: refs/heads/{branch}"}
            repo.branches[branch] = self._resolve(repo, body.get("startingPoint") or "main")
        return 200, {}

    def preupload(self, repo_type: str, repo_id: str, revision: str, body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            head = self._resolve(repo, revision)
            tree = repo.trees[head]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in body.get("files", [])
        ]
        return 200, {"files": files, "commitOid": head}

    def commit(
        self, repo_type: str, repo_id: str, branch: str, lines: list[dict[str, Any]]
    ) -> tuple[int, Any]:
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first NDJSON line of a commit must be its header")
        header = lines[0]["value"]
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if branch not in repo.branches:
                raise HubHTTPError(404, f"Invalid rev id: {branch}", error_code="RevisionNotFound")
            parent = repo.branches[branch]
            if header.get("parentCommit") not in (None, parent):
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.trees[parent])
            paths = []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubHTTPError(400, f"unsupported encoding {value.get('encoding')!r}")
                    tree[value["path"]] = self._write_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {path: sha for path, sha in tree.items() if not path.startswith(prefix)}
                else:
                    raise HubHTTPError(400, f"LocalHub stores regular files only; got a {key!r} operation")
                paths.append(value["path"])
            oid = self._new_commit_oid(repo, parent, tree, header.get("summary", ""))
            repo.trees[oid] = tree
            repo.branches[branch] = oid
            self.commits.append(
                CommitRecord(
                    repo_id=repo_id,
                    repo_type=repo_type,
                    branch=branch,
                    oid=oid,
                    summary=header.get("summary", ""),
                    description=header.get("description", ""),
                    paths=tuple(paths),
                )
            )
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{oid}"
        return 200, {
            "success": True,
            "commitOid": oid,
            "commitUrl": url,
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> tuple[int, Any]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            paths = sorted(repo.trees[sha])
        return 200, {
            "id": repo_id,
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in paths],
        }

    def tree(
        self, repo_type: str, repo_id: str, revision: str, folder: str, recursive: bool
    ) -> tuple[int, Any]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            tree = dict(repo.trees[self._resolve(repo, revision)])
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, sha in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            folders = parts[:-1] if recursive else parts[:1] if len(parts) > 1 else []
            for i in range(1, len(folders) + 1):
                folder_path = prefix + "/".join(parts[:i])
                entries.setdefault(
                    folder_path, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder_path}
                )
            if recursive or len(parts) == 1:
                size = (self._root / "blobs" / sha).stat().st_size
                entries[path] = {"type": "file", "oid": sha, "size": size, "path": path}
        if prefix and not entries:
            raise HubHTTPError(404, f"Entry not found: {folder}", error_code="EntryNotFound")
        return 200, list(entries.values())

    def resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> tuple[str, str]:
        """(commit oid, blob sha) of `filename` at `revision`."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = self._resolve(repo, revision)
            sha = repo.trees[commit].get(filename)
        if sha is None:
            raise HubHTTPError(
                404, f"Entry not found: {filename}", error_code="EntryNotFound", repo_commit=commit
            )
        return commit, sha


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub  # set on the per-server subclass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("LocalHub %s", format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # -- plumbing -----------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # a HEAD answer announces the body it omits
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _send_error(self, error: HubHTTPError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.repo_commit:
            headers["X-Repo-Commit"] = error.repo_commit
        self._send_json(error.status, {"error": error.message}, headers)

    def _handle(self, method: str) -> None:
        authorization = self.headers.get("Authorization")
        split = urlsplit(self.path)
        self.hub.requests.append(RecordedRequest(method, split.path, authorization))
        body = self._read_body() if method == "POST" else b""  # always drained: see _send's Connection: close
        try:
            if self.hub.delay_s:
                time.sleep(self.hub.delay_s)
            if self.hub.fail_with is not None:
                raise HubHTTPError(
                    self.hub.fail_with, f"LocalHub configured to fail with {self.hub.fail_with}"
                )
            if self.hub.token is not None and authorization != f"Bearer {self.hub.token}":
                message = "Invalid credentials in Authorization header" if authorization else "Unauthorized"
                raise HubHTTPError(401, message)
            segments = [unquote(s) for s in split.path.strip("/").split("/")]
            self._route(method, segments, parse_qs(split.query), body)
        except HubHTTPError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. a timeout test)
        except Exception as error:  # a LocalHub bug: answer 500 so the test fails loudly
            logger.exception("LocalHub failed on %s %s", method, self.path)
            self._send_error(HubHTTPError(500, f"LocalHub internal error: {error!r}"))

    def _route(self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub = self.hub
        if segments[0] == "api":
            if method == "POST" and segments[1:] == ["repos", "create"]:
                return self._send_json(*hub.create_repo(json.loads(body)))
            if method == "POST" and segments[1:] == ["validate-yaml"]:
                return self._send_json(*hub.validate_yaml(json.loads(body)))
            if len(segments) >= 4 and segments[1] in REPO_TYPES:
                repo_type, repo_id, rest = REPO_TYPES[segments[1]], "/".join(segments[2:4]), segments[4:]
                if method == "GET" and not rest:
                    return self._send_json(*hub.repo_info(repo_type, repo_id, "main"))
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._send_json(*hub.repo_info(repo_type, repo_id, rest[1]))
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._send_json(
                        *hub.tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), recursive)
                    )
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._send_json(
                        *hub.create_branch(repo_type, repo_id, rest[1], json.loads(body or b"{}"))
                    )
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._send_json(*hub.preupload(repo_type, repo_id, rest[1], json.loads(body)))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    if query.get("create_pr"):
                        raise HubHTTPError(400, "LocalHub does not implement pull requests")
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    return self._send_json(*hub.commit(repo_type, repo_id, rest[1], lines))
            raise HubHTTPError(404, f"LocalHub has no route for {method} /{'/'.join(segments)}")
        if method in ("GET", "HEAD"):
            repo_type = REPO_TYPES.get(segments[0]) if segments[0] in ("datasets", "spaces") else "model"
            path = segments[1:] if repo_type != "model" else segments
            if len(path) >= 5 and path[2] == "resolve":
                return self._send_file(repo_type, "/".join(path[:2]), path[3], "/".join(path[4:]))
        raise HubHTTPError(404, f"LocalHub has no route for {method} /{'/'.join(segments)}")

    def _send_file(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        commit, sha = self.hub.resolve(repo_type, repo_id, revision, filename)
        content = self.hub._read_blob(sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{sha}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
        }
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            return self._send(200, content, headers)
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else len(content) - 1
        part = content[start : end + 1]
        headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(content)}"
        return self._send(206, part, headers)
