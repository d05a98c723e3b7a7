"""A STAND-IN for the Hugging Face Hub: a loopback HTTP server that speaks the slice of the Hub API
huggingface_hub (2.x) calls for create_repo, model_info / repo_info, list_repo_tree (what
snapshot_download lists), create_commit (preupload, commit) and file downloads (HEAD/GET
.../resolve/...). It is not the Hub and does not pretend to be:

- every file is committed inline (preupload answers "regular"; the real Hub routes large files
  through LFS/Xet, which this stand-in does not implement and answers 400 if asked);
- repos live in memory; a commit SHA is a sha1 of the commit's content, blobs are git blob SHAs;
- auth: if `token` is set, writes need `Authorization: Bearer <token>`, and private repos are
  invisible (404 RepoNotFound, as the Hub answers) to requests without it;
- every request is recorded (method, path, authorization header) for tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    parent: str | None
    files: dict[str, bytes]
    added: list[str]
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, message: str, files: dict[str, bytes], added=(), deleted=(), branch: str = "main") -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_sha(c)) for p, c in files.items())])
                              .encode() + str(len(self.commits)).encode())
        commit = Commit(digest.hexdigest(), message, parent, dict(files), list(added), list(deleted))
        self.commits.append(commit)
        self.branches[branch] = commit.sha
        return commit

    def at(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return next((c for c in self.commits if c.sha == sha), None)


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class HubStandin:
    """Use as a context manager; `url` is the endpoint to give HfApi(endpoint=...) / HF_ENDPOINT."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        repo.commit("initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        if files:
            repo.commit("add files", {**repo.at("main").files, **files}, added=sorted(files))
        self.repos[repo_id] = repo
        return repo

    def file_requests(self, repo_id: str) -> list[Request]:
        """GET/HEAD requests for files of repo_id (downloads), in order."""
        return [r for r in self.requests if r.path.startswith(f"/{repo_id}/resolve/")]


def _handler(hub: HubStandin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # --- plumbing ---------------------------------------------------------------------------
        def _route(self, method: str) -> None:
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with hub._lock:
                hub.requests.append(Request(method, path, self.headers.get("Authorization")))
                try:
                    self._dispatch(method, path, query, body)
                except _Reply as reply:
                    self._send(reply.status, reply.payload, reply.headers, head=method == "HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def _send(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            content_type = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str) -> Repo:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return repo

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.at(revision)
            if commit is None:
                raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return commit

        def _require_write(self) -> None:
            if not self._authorized():
                raise _Reply(401, {"error": "Invalid credentials in Authorization header"})

        # --- routes -----------------------------------------------------------------------------
        def _dispatch(self, method: str, path: str, query: dict, body: bytes) -> None:
            parts = path.strip("/").split("/")
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                raise _Reply(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rest = parts[4:]
                if method == "GET" and (not rest or rest[0] == "revision"):
                    revision = "/".join(rest[1:]) if rest else "main"
                    return self._model_info(repo_id, revision)
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query.get("recursive") == ["true"])
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body))
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit_files(repo_id, "/".join(rest[1:]), body)
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            raise _Reply(404, {"error": f"the stand-in does not implement {method} {path}"})

        def _create_repo(self, payload: dict) -> None:
            self._require_write()
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in hub.repos:
                raise _Reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.add_repo(repo_id, {}, private=payload.get("visibility", "public") == "private"
                         or payload.get("private", False))
            raise _Reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _model_info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            siblings = [{"rfilename": name, "size": len(content), "blobId": git_blob_sha(content)}
                        for name, content in sorted(commit.files.items())]
            raise _Reply(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                               "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> None:
            commit = self._commit(self._repo(repo_id), revision)
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            entries, folders = [], set()
            for name, content in sorted(commit.files.items()):
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix):].split("/")
                depths = range(1, len(parts)) if recursive else range(1, min(2, len(parts)))  # parent folders
                folders.update(prefix + "/".join(parts[:depth]) for depth in depths)
                if recursive or len(parts) == 1:
                    entries.append({"type": "file", "path": name, "size": len(content), "oid": git_blob_sha(content)})
            entries += [{"type": "directory", "path": name, "oid": git_blob_sha(name.encode())}
                        for name in sorted(folders)]
            raise _Reply(200, entries)

        def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
            self._require_write()
            commit = self._commit(self._repo(repo_id), revision)
            files = []
            for item in payload["files"]:
                existing = commit.files.get(item["path"])
                files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                              "oid": None if existing is None else git_blob_sha(existing)})
            raise _Reply(200, {"files": files, "commitOid": commit.sha})

        def _commit_files(self, repo_id: str, revision: str, body: bytes) -> None:
            self._require_write()
            repo = self._repo(repo_id)
            head = self._commit(repo, revision)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            if header.get("parentCommit") not in (None, head.sha):
                raise _Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
            files, added, deleted = dict(head.files), [], []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    added.append(value["path"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Reply(404, {"error": "A file with this name doesn't exist"},
                                     {"X-Error-Code": "EntryNotFound"})
                    del files[value["path"]]
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for name in [n for n in files if n.startswith(prefix)]:
                        del files[name]
                        deleted.append(name)
                else:
                    raise _Reply(400, {"error": f"the stand-in accepts inline files only, not {key!r}"})
            commit = repo.commit(header["summary"], files, added, deleted, branch=revision)
            raise _Reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit.sha}", "commitOid": commit.sha,
                               "pullRequestUrl": None})

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            commit = self._commit(self._repo(repo_id), unquote(revision))
            content = commit.files.get(filename)
            if content is None:
                raise _Reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                 "X-Repo-Commit": commit.sha})
            raise _Reply(200, content, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(content)}"'})

    return Handler


class _Reply(Exception):
    def __init__(self, status: int, payload, headers: dict | None = None):
        self.status, self.payload, self.headers = status, payload, headers or {}
