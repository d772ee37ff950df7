"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4's
``snapshot_download`` and ``hf_hub_download`` call, served over HTTP on 127.0.0.1 from a
folder tree, for tests in this process or in subprocesses (``HF_ENDPOINT``).

Layout of ``root`` (read when the server starts; ``<type>`` is ``models`` or ``datasets``)::

    root/<type>/<org>/<name>/<files...>          repo <org>/<name>, branch "main"
    root/<type>/<org>/<name>@<branch>/<files...> another branch or tag of it, URL-quoted
                                                 (name@v1, name@refs%2Fconvert%2Fparquet)

Each revision's commit is a fixed fake sha1 of the repo, the branch and its files' hashes;
a revision can be asked for by its name or its commit. Files whose suffix is in
:data:`LFS_SUFFIXES` are LFS files, as with the Hub's default .gitattributes: their
``resolve`` answers 302 to a second port standing for the CDN (another origin, so
huggingface_hub reads ``X-Linked-Etag``/``X-Linked-Size`` from the redirect and drops the
authorization header, as with the real Hub); the others are served directly with their git
blob hash as ``ETag``. No Xet headers are sent, so the plain HTTP download path is taken.

Errors are the Hub's (``X-Error-Code``, which huggingface_hub turns into its exceptions):
an unknown repo is 401 ``RepoNotFound`` (404 with a token), an unknown revision 404
``RevisionNotFound``, a missing file 404 ``EntryNotFound``. A repo listed in ``gated`` has
public info and listing but its files need ``Authorization: Bearer <token>``: 401
``GatedRepo`` without a token, 403 with another one.

Use in this process: ``with HubServer(root) as hub: use_hub(monkeypatch, hub, cache)``
(huggingface_hub reads its settings at import, :func:`use_hub` patches them); in a
subprocess: ``env={**os.environ, **hub.env(cache)}``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = frozenset({".safetensors", ".bin", ".parquet", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".npz",
                          ".npy", ".onnx", ".arrow", ".zip"})
REPO_TYPES = {"models": "model", "datasets": "dataset"}


@dataclass(frozen=True)
class RepoFile:
    """One file of a revision: where it is, its size, sha256 and git blob hash (of the LFS
    pointer for an LFS file, as on the Hub)."""

    source: Path
    size: int
    sha256: str
    oid: str
    lfs: bool
    pointer_size: int


@dataclass(frozen=True)
class Revision:
    commit: str
    files: dict[str, RepoFile]  # repo path -> file


def add_repo(root: str | Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
             revision: str = "main") -> Path:
    """Write the ``files`` (repo path -> content) of ``repo_id`` at branch or tag ``revision``
    into the tree ``root``; the repo's folder."""
    name = repo_id if revision == "main" else f"{repo_id}@{quote(revision, safe='')}"
    folder = Path(root) / f"{repo_type}s" / name
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def _repo_file(path: Path) -> RepoFile:
    size, sha256 = path.stat().st_size, hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    if path.suffix not in LFS_SUFFIXES:
        return RepoFile(path, size, sha256.hexdigest(), git.hexdigest(), False, 0)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\nsize {size}\n".encode()
    pointer_oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return RepoFile(path, size, sha256.hexdigest(), pointer_oid, True, len(pointer))


def scan(root: Path) -> dict[tuple[str, str], dict[str, Revision]]:
    """(repo type, repo id) -> revision name and commit -> revision, of the tree ``root``."""
    repos: dict[tuple[str, str], dict[str, Revision]] = {}
    for folder, repo_type in REPO_TYPES.items():
        for repo_dir in sorted((root / folder).glob("*/*")):
            name, _, branch = repo_dir.name.partition("@")
            repo_id, branch = f"{repo_dir.parent.name}/{name}", unquote(branch) or "main"
            files = {p.relative_to(repo_dir).as_posix(): _repo_file(p)
                     for p in sorted(repo_dir.rglob("*")) if p.is_file()}
            listing = "".join(f"{path} {f.sha256}\n" for path, f in files.items())
            commit = hashlib.sha1(f"{repo_type} {repo_id}@{branch}\n{listing}".encode()).hexdigest()
            revision = Revision(commit, files)
            repos.setdefault((repo_type, repo_id), {}).update({branch: revision, commit: revision})
    return repos


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer, cdn: bool):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.cdn = hub, cdn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """The stand-in Hub over ``root`` (see the module's docstring), a context manager that
    starts it (``url``: what to set HF_ENDPOINT to) and stops it. ``requests`` logs
    ``"METHOD path"`` of every request it answered, the CDN's included."""

    def __init__(self, root: str | Path, gated: Iterable[str] = (), token: str | None = None):
        self.root, self.gated, self.token = Path(root), frozenset(gated), token
        self.requests: list[str] = []
        self.repos: dict[tuple[str, str], dict[str, Revision]] = {}
        self.blobs: dict[str, RepoFile] = {}  # sha256 -> file, what the CDN serves
        self._servers: list[_Server] = []

    @property
    def url(self) -> str:
        return self._servers[0].url

    @property
    def cdn_url(self) -> str:
        return self._servers[1].url

    def commit(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        """The commit of ``repo_id`` at ``revision``."""
        return self.repos[repo_type, repo_id][revision].commit

    def env(self, cache: str | Path) -> dict[str, str]:
        """The environment that points huggingface_hub at this server with the Hub cache
        ``cache`` (and HF_HOME beside it, so that no stored token is sent)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": str(cache), "HF_HOME": str(Path(cache).parent / "hf_home"),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def __enter__(self) -> HubServer:
        self.repos = scan(self.root)
        self.blobs = {f.sha256: f for revs in self.repos.values() for r in revs.values() for f in r.files.values()}
        self._servers = [_Server(self, cdn=False), _Server(self, cdn=True)]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def use_hub(monkeypatch, hub: HubServer, cache: str | Path, offline: bool = False) -> None:
    """Point this process's huggingface_hub at ``hub`` with the Hub cache ``cache`` (its
    environment and the settings it read at import), offline or not, with no token."""
    from huggingface_hub import constants

    env = hub.env(cache) | {"HF_HUB_OFFLINE": "1" if offline else "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", env["HF_HOME"] + "/token")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        self.server.hub.requests.append(f"{self.command} {self.path}")
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if self.server.cdn:
            blobs = self.server.hub.blobs
            if len(parts) == 2 and parts[0] == "cdn" and parts[1] in blobs:
                return self._file(blobs[parts[1]], {}, body)
            return self._send(404, {}, b"not found", body)
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[parts[1]], "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._info(repo_type, repo_id, "main", body)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_type, repo_id, rest[1], body)
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), recursive, body)
        repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
        parts = parts[1:] if repo_type == "dataset" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._send(404, {}, b"not found", body)

    def _revision(self, repo_type: str, repo_id: str, revision: str, body: bool) -> Revision | None:
        """The revision, or None after answering the Hub's error for an unknown repo or revision."""
        revisions = self.server.hub.repos.get((repo_type, repo_id))
        if revisions is None:
            status = 404 if self.headers.get("Authorization") else 401
            self._error(status, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in revisions:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return revisions[revision]

    def _info(self, repo_type: str, repo_id: str, revision: str, body: bool) -> None:
        rev = self._revision(repo_type, repo_id, revision, body)
        if rev is not None:
            self._json({"_id": rev.commit[:24], "id": repo_id, "sha": rev.commit, "private": False,
                        "gated": "manual" if repo_id in self.server.hub.gated else False, "disabled": False,
                        "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                        "siblings": [{"rfilename": p} for p in rev.files]}, body)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool, body: bool) -> None:
        rev = self._revision(repo_type, repo_id, revision, body)
        if rev is None:
            return
        prefix = f"{path}/" if path else ""
        below = [p for p in rev.files if p.startswith(prefix)]
        if path and not below:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", body, rev.commit)
        entries: dict[str, dict] = {}
        for p in below:
            rel = p[len(prefix):].split("/")
            for depth in range(1, (len(rel) if recursive else 1) + 1):
                entry = prefix + "/".join(rel[:depth])
                if depth < len(rel):
                    entries[entry] = {"type": "directory", "path": entry, "size": 0,
                                      "oid": hashlib.sha1(entry.encode()).hexdigest()}
                    continue
                f = rev.files[p]
                entries[entry] = {"type": "file", "path": entry, "size": f.size, "oid": f.oid}
                if f.lfs:
                    entries[entry]["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        self._json([entries[k] for k in sorted(entries)], body)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, body: bool) -> None:
        rev = self._revision(repo_type, repo_id, revision, body)
        if rev is None:
            return
        hub = self.server.hub
        if repo_id in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
            if self.headers.get("Authorization"):
                return self._error(403, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted and you are "
                                   "not in the authorized list. Visit its page to ask for access.", body)
            return self._error(401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.", body)
        f = rev.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", body, rev.commit)
        headers = {"X-Repo-Commit": rev.commit, "ETag": f'"{f.oid}"'}
        if not f.lfs:
            return self._file(f, headers, body)
        self._send(302, headers | {"Location": f"{hub.cdn_url}/cdn/{f.sha256}", "X-Linked-Etag": f'"{f.sha256}"',
                                   "X-Linked-Size": str(f.size)}, b"", body)

    def _file(self, f: RepoFile, headers: dict[str, str], body: bool) -> None:
        """The bytes of ``f``, streamed (no ranges: huggingface_hub restarts a broken download
        from the start when it gets a 200)."""
        self._head(200, headers | {"Content-Type": "application/octet-stream", "Content-Length": str(f.size)})
        if body:
            with open(f.source, "rb") as src:
                shutil.copyfileobj(src, self.wfile)

    def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode(), body)

    def _json(self, obj, body: bool) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), body)

    def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        self._head(status, headers | {"Content-Length": str(len(data))})
        if body:
            self.wfile.write(data)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
