"""A Hugging Face Hub-protocol server on 127.0.0.1 for end-to-end tests.

It implements what the real ``huggingface_hub`` client (2.x, httpx2) calls
for downloads and uploads, read from the client's source:

- ``GET  /api/models/{repo}[/revision/{rev}]``      model info (sha, siblings)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``   file listing (oid, size, lfs)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``          X-Repo-Commit, ETag, X-Linked-Etag/Size, Range
- ``POST /api/repos/create``                         create (409 when it exists)
- ``POST /api/models/{repo}/branch/{branch}``        create a branch
- ``POST /api/models/{repo}/preupload/{rev}``        upload mode per file ("regular" or "lfs") + remote oid
- ``POST /{repo}.git/info/lfs/objects/batch``        LFS batch API (basic transfer), then PUT + verify
- ``POST /api/models/{repo}/commit/{rev}``           NDJSON commit with parentCommit check (412)
- ``POST /api/validate-yaml``, ``GET /api/whoami-v2``

Xet is not implemented: clients must run with ``HF_HUB_DISABLE_XET``.
Faults (an HTTP status, a dropped connection, or a dropped response after the
request was processed) can be injected per route; every request is logged.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".model")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
WRITE_TOKEN = "hf_test_write_token_0123456789"  # user "tester", may write
READ_TOKEN = "hf_test_read_token_0123456789"  # user "tester", read only


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    headers: dict[str, str]
    drop: bool  # close the connection instead of answering
    after: bool  # process the request, then drop the response
    run: Callable[[], None] | None  # run this (e.g. a concurrent commit), then process the request normally


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    auth: bool


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FakeHub:
    """State and routing of the fake Hub; ``start()`` serves it on a random port."""

    def __init__(self, *, upload_mode: str = "auto", tokens: dict[str, tuple[str, str]] | None = None) -> None:
        self.upload_mode = upload_mode  # "auto" (Hub rules), "regular" (all inline) or "lfs" (all LFS but empty files)
        self.tokens = tokens if tokens is not None else {WRITE_TOKEN: ("tester", "write"), READ_TOKEN: ("tester", "read")}
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[Request] = []
        self.unhandled: list[str] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._counter = 0
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- test helpers --------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, message: str = "initial") -> str:
        """Create a repo whose main branch holds ``files`` (LFS for weight suffixes); returns the commit sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private))
            blobs = {".gitattributes": Blob(GITATTRIBUTES, False)}
            blobs.update({p: Blob(d, self._is_lfs(p, len(d), "auto")) for p, d in files.items()})
            for blob in blobs.values():
                if blob.lfs:
                    self.lfs_store[blob.sha256] = blob.data
            sha = self._new_commit(repo, repo.branches.get("main"), message, blobs)
            repo.branches["main"] = sha
            return sha

    def inject(self, method: str, path_regex: str, *, status: int = 503, times: int = 1,
               headers: dict[str, str] | None = None, drop: bool = False, after: bool = False,
               run: Callable[[], None] | None = None) -> None:
        """Fail the next ``times`` requests matching ``method`` and ``path_regex`` (searched in the path).

        ``drop``: close the connection without an answer; ``after``: process the
        request first (it takes effect) and then drop the answer; ``run``: call
        it, then process the request normally.
        """
        hdrs = {"Retry-After": "0"} if status in (429, 503) else {}
        hdrs.update(headers or {})
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, hdrs, drop, after, run))

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: b.data for p, b in repo.commits[self._resolve(repo, revision)].files.items()}

    def blob(self, repo_id: str, path: str, revision: str = "main") -> Blob:
        repo = self.repos[repo_id]
        return repo.commits[self._resolve(repo, revision)].files[path]

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        repo = self.repos[repo_id]
        out, sha = [], repo.branches[branch]
        while sha is not None:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    # -- internals -----------------------------------------------------------------------------
    def _is_lfs(self, path: str, size: int, mode: str | None = None) -> bool:
        mode = mode or self.upload_mode
        if size == 0 or mode == "regular":
            return False
        return mode == "lfs" or path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}|{parent}|{message}|{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].git_oid}".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, parent, message, dict(files))
        return sha

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})

    def _user(self, auth: str | None) -> tuple[str, str] | None:
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            # Echo the token like a careless server would, so tests can check that surgeon never prints it.
            raise _Reply(401, {"error": f"Invalid credentials in Authorization header (token {token})"},
                         {"X-Error-Message": "Invalid credentials in Authorization header"})
        return self.tokens[token]

    def _repo(self, repo_id: str, auth: str | None, *, write: bool = False) -> Repo:
        user = self._user(auth)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise _Reply(401 if user is None else 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if write:
            self._require_write(user)
        return repo

    @staticmethod
    def _require_write(user: tuple[str, str] | None) -> None:
        if user is None:
            raise _Reply(401, {"error": "You must be authenticated to do this"})
        if user[1] != "write":
            raise _Reply(403, {"error": "You don't have the rights to write to this repo"},
                         {"X-Error-Message": "You don't have the rights to write to this repo"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        body = self._read_body()
        fault = self._take_fault(method, split.path)
        if fault is not None and fault.run is not None:
            with fake.lock:
                fault.run()
            fault = None
        if fault is not None and not fault.after:
            self._fault(method, path, fault)
            return
        try:
            with fake.lock:
                status, payload, headers = route(fake, method, path, split.path, query, body, self.headers, self._base())
        except _Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        if fault is not None:  # processed, but the client never hears back
            self._fault(method, path, fault)
            return
        with fake.lock:
            fake.log.append(Request(method, path, status, bool(self.headers.get("Authorization"))))
        self._send(method, status, payload, headers)

    def _take_fault(self, method: str, raw_path: str) -> Fault | None:
        with self.fake.lock:
            for fault in self.fake.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(unquote(raw_path)):
                    fault.times -= 1
                    return fault
        return None

    def _fault(self, method: str, path: str, fault: Fault) -> None:
        with self.fake.lock:
            self.fake.log.append(Request(method, path, -1 if fault.drop else fault.status, False))
        if fault.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        self._send(method, fault.status, {"error": f"injected {fault.status}"}, fault.headers)

    def _base(self) -> str:
        return self.fake.url

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            ctype = headers.pop("Content-Type", "application/octet-stream")
        else:
            data = b"" if payload is None else json.dumps(payload).encode()
            ctype = headers.pop("Content-Type", "application/json")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD" and data:
            self.wfile.write(data)


# -- routes ------------------------------------------------------------------------------------

def route(fake: FakeHub, method: str, path: str, raw_path: str, query: dict[str, list[str]], body: bytes,
          headers: Any, base: str) -> tuple[int, Any, dict[str, str]]:
    auth = headers.get("Authorization")
    m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", path)
    if m and method == "GET":
        return _model_info(fake, m["repo"], m["rev"] or "main", auth)
    m = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rest>.+)", raw_path)
    if m and method == "GET":
        rev, _, sub = m["rest"].partition("/")
        return _tree(fake, unquote(m["repo"]), unquote(rev), unquote(sub), query, auth)
    m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rest>.+)", raw_path)
    if m and method in ("GET", "HEAD"):
        rev, _, file = m["rest"].partition("/")
        return _resolve_file(fake, m["repo"], unquote(rev), unquote(file), headers, auth)
    if path == "/api/repos/create" and method == "POST":
        return _create_repo(fake, json.loads(body), auth, base)
    m = re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>.+)", path)
    if m and method == "POST":
        return _create_branch(fake, m["repo"], m["branch"], json.loads(body or b"{}"), auth)
    m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", path)
    if m and method == "POST":
        return _preupload(fake, m["repo"], m["rev"], json.loads(body), auth)
    m = re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)
    if m and method == "POST":
        return _lfs_batch(fake, m["repo"], json.loads(body), auth, base)
    m = re.fullmatch(r"/__lfs/upload/(?P<oid>[0-9a-f]{64})", path)
    if m and method == "PUT":
        return _lfs_put(fake, m["oid"], body)
    if path == "/__lfs/verify" and method == "POST":
        info = json.loads(body)
        ok = fake.lfs_store.get(info["oid"]) is not None and len(fake.lfs_store[info["oid"]]) == info["size"]
        return (200, {}, {}) if ok else (404, {"error": "object not found"}, {})
    m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>.+)", path)
    if m and method == "POST":
        return _commit(fake, m["repo"], m["rev"], body, query, auth, base)
    if path == "/api/validate-yaml" and method == "POST":
        return _validate_yaml(json.loads(body))
    if path == "/api/agent-harnesses" and method == "GET":  # huggingface_hub's user-agent telemetry
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}
    if path == "/api/whoami-v2" and method == "GET":
        user = fake._user(auth)
        if user is None:
            raise _Reply(401, {"error": "Invalid username or password."})
        return 200, {"type": "user", "name": user[0], "auth": {"accessToken": {"displayName": "test", "role": user[1]}}}, {}
    fake.unhandled.append(f"{method} {raw_path}")
    return 404, {"error": f"fake hub: no route for {method} {path}"}, {}


def _model_info(fake: FakeHub, repo_id: str, rev: str, auth: str | None) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth)
    sha = fake._resolve(repo, rev)
    files = repo.commits[sha].files
    now = _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return 200, {
        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
        "private": repo.private, "sha": sha, "lastModified": now, "createdAt": now, "tags": [],
        "siblings": [{"rfilename": p} for p in sorted(files)],
    }, {}


def _tree(fake: FakeHub, repo_id: str, rev: str, sub: str, query: dict[str, list[str]],
          auth: str | None) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth)
    files = repo.commits[fake._resolve(repo, rev)].files
    recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
    prefix = f"{sub.rstrip('/')}/" if sub else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            folder = prefix + rest.split("/")[0]
            entries[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
            continue
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        entries[path] = entry
    return 200, list(entries.values()), {}


def _resolve_file(fake: FakeHub, repo_id: str, rev: str, file: str, headers: Any,
                  auth: str | None) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth)
    sha = fake._resolve(repo, rev)
    blob = repo.commits[sha].files.get(file)
    if blob is None:
        raise _Reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
    out = {"X-Repo-Commit": sha, "ETag": f'"{blob.git_oid}"', "Accept-Ranges": "bytes"}
    if blob.lfs:
        out.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
    data = blob.data
    rng = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range") or "")
    if rng:
        start = int(rng[1])
        end = int(rng[2]) + 1 if rng[2] else len(data)
        out["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return 206, data[start:end], out
    return 200, data, out


def _create_repo(fake: FakeHub, payload: dict[str, Any], auth: str | None, base: str) -> tuple[int, Any, dict[str, str]]:
    user = fake._user(auth)
    fake._require_write(user)
    assert user is not None
    repo_id = f"{payload.get('organization') or user[0]}/{payload['name']}"
    if repo_id in fake.repos:
        return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}, {}
    private = payload.get("visibility") == "private" or bool(payload.get("private"))
    repo = fake.repos[repo_id] = Repo(repo_id, private)
    repo.branches["main"] = fake._new_commit(repo, None, "initial commit", {".gitattributes": Blob(GITATTRIBUTES, False)})
    return 200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}, {}


def _create_branch(fake: FakeHub, repo_id: str, branch: str, payload: dict[str, Any],
                   auth: str | None) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth, write=True)
    if branch in repo.branches:
        return 409, {"error": f"Reference already exists: refs/heads/{branch}"}, {}
    repo.branches[branch] = fake._resolve(repo, payload.get("startingPoint") or "main")
    return 200, {}, {}


def _preupload(fake: FakeHub, repo_id: str, rev: str, payload: dict[str, Any],
               auth: str | None) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth, write=True)
    current = repo.commits[fake._resolve(repo, rev)].files
    out = []
    for f in payload["files"]:
        lfs = fake._is_lfs(f["path"], int(f["size"]))
        existing = current.get(f["path"])
        oid = None if existing is None else (existing.sha256 if lfs else git_blob_oid(existing.data))
        out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return 200, {"files": out, "commitOid": repo.branches.get(rev)}, {}


def _lfs_batch(fake: FakeHub, repo_id: str, payload: dict[str, Any], auth: str | None,
               base: str) -> tuple[int, Any, dict[str, str]]:
    fake._repo(repo_id, auth, write=True)
    objects = []
    for obj in payload["objects"]:
        entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in fake.lfs_store:
            entry["actions"] = {
                "upload": {"href": f"{base}/__lfs/upload/{obj['oid']}", "expires_in": 86400},
                "verify": {"href": f"{base}/__lfs/verify", "header": {}},
            }
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}


def _lfs_put(fake: FakeHub, oid: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
    if hashlib.sha256(body).hexdigest() != oid:
        return 400, {"error": "sha256 mismatch"}, {}
    fake.lfs_store[oid] = body
    return 200, None, {}


def _commit(fake: FakeHub, repo_id: str, rev: str, body: bytes, query: dict[str, list[str]], auth: str | None,
            base: str) -> tuple[int, Any, dict[str, str]]:
    repo = fake._repo(repo_id, auth, write=True)
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    header = lines[0]["value"]
    head = fake._resolve(repo, rev)
    if header.get("parentCommit") and header["parentCommit"] != head:
        raise _Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
    files = dict(repo.commits[head].files)
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        if key == "file":
            files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
        elif key == "lfsFile":
            data = fake.lfs_store.get(value["oid"])
            if data is None:
                raise _Reply(400, {"error": f"LFS object {value['oid']} was not uploaded"})
            files[value["path"]] = Blob(data, True)
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key == "deletedFolder":
            files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
    create_pr = query.get("create_pr", ["0"])[0] == "1"
    branch = rev
    if create_pr:
        repo.prs += 1
        branch = f"refs/pr/{repo.prs}"
    sha = fake._new_commit(repo, head, header["summary"], files)
    repo.branches[branch] = sha
    pr_url = f"{base}/{repo_id}/discussions/{repo.prs}" if create_pr else None
    return 200, {"success": True, "commitOid": sha, "commitUrl": f"{base}/{repo_id}/commit/{sha}",
                 "hookOutput": "", "pullRequestUrl": pr_url}, {}


def _validate_yaml(payload: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    content = payload.get("content", "")
    m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    try:
        data = yaml.safe_load(m[1]) if m else {}
    except yaml.YAMLError as exc:
        return 400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []}, {}
    if m and not isinstance(data, dict):
        return 400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, {}
    return 200, {"errors": [], "warnings": []}, {}


__all__ = ["Blob", "FakeHub", "READ_TOKEN", "WRITE_TOKEN", "git_blob_oid"]
