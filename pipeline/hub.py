"""Snapshots of Hugging Face Hub repositories (models, parquet datasets) through
huggingface_hub's cache, pinned to a revision, with a manifest of what was fetched.

:func:`download` fetches a repo's files into the Hub cache (``cache_dir``, else
``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub) or finds them there;
with ``HF_HUB_OFFLINE=1`` a complete cached snapshot is used without any network call. Its
:class:`Snapshot` (local folder, requested revision, resolved commit, sha256 and size of every
file) is what :func:`write_manifest` writes and :func:`read_manifest` reads back, so later
steps take the folder from the manifest. :func:`dataset_split_files` finds the parquet files
of one split in a dataset snapshot.

Every failure of the Hub is one :class:`HubError` subclass whose message names the repo and
what to do. huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and
``HF_HUB_OFFLINE`` when it is imported, ``HF_TOKEN`` on every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from pipeline.io import write_json

REPO_TYPES = ("model", "dataset")
# Model snapshots: config.json and the small tokenizer/preprocessor files when the repo has
# them, plus the weights of _WEIGHTS' first kind present (safetensors before pickles).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "preprocessor_config.json")
_WEIGHTS = (re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"),
            re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?"))
DATASET_PATTERNS = ("*.parquet", "README.md")  # fnmatch: "*" spans folders
_HEX40, _HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
_SHARD_SUFFIX = re.compile(r"(-\d+-of-\d+)?(-[0-9a-f]{16})?$")  # -00000-of-00002, -<hash> of push_to_hub


class HubError(RuntimeError):
    """A repo could not be fetched from the Hub nor found in its cache (or its files are wrong)."""


class HubOfflineError(HubError):
    """``HF_HUB_OFFLINE`` is set and the snapshot is not (completely) cached."""


class HubNetworkError(HubError):
    """The Hub could not be reached and the snapshot is not (completely) cached."""


class HubGatedError(HubError):
    """The repo is gated and the token (if any) has not been granted access."""


class HubRepoNotFoundError(HubError):
    """No such repo, or a private one the token cannot see."""


class HubRevisionNotFoundError(HubError):
    """The repo exists but not the revision."""


@dataclass(frozen=True)
class FileInfo:
    """sha256 and size in bytes of one file of a snapshot."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    """A repo's files at one commit in the Hub cache: ``path`` is the snapshot folder,
    ``revision`` what was asked for (branch, tag or commit), ``commit`` what it resolved to,
    ``files`` each file's repo path (``/``-separated, sorted) with its hash and size."""

    path: Path
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: Mapping[str, FileInfo]


def download(repo_id: str, revision: str, repo_type: str = "model", allow_patterns: Sequence[str] | None = None,
             cache_dir: str | Path | None = None) -> Snapshot:
    """The snapshot of ``repo_id`` at ``revision`` (branch, tag or 40-hex commit) in the Hub
    cache, downloading what is missing. ``allow_patterns`` (fnmatch on repo paths) picks the
    files; by default a model gets :data:`MODEL_FILES` present and its weights (the
    safetensors, else ``pytorch_model.bin``, sharded or not, top level only), a dataset
    :data:`DATASET_PATTERNS`. Every file is hashed and checked against the cache's blob name
    (the Hub's sha256 or git hash of it)."""
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    what = f"{repo_type} {repo_id!r} at revision {revision!r}"
    page = f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    with _hub_errors(what, page, cache_dir):
        kw = dict(repo_id=repo_id, repo_type=repo_type, cache_dir=cache_dir)
        commit = revision
        if allow_patterns is not None:
            patterns = list(allow_patterns)
        elif repo_type == "dataset":
            patterns = list(DATASET_PATTERNS)
        else:
            # A first snapshot of config.json resolves the revision and caches the repo's file
            # listing (online), or finds both in the cache (offline); the weights are chosen
            # from that listing, with no second look-up.
            probe = Path(snapshot_download(revision=revision, allow_patterns=["config.json"], **kw))
            commit = probe.name
            listing = _listing(repo_id, repo_type, commit, cache_dir)
            patterns = _model_files(listing if listing is not None else _files_on_disk(probe), what)
        path = Path(snapshot_download(revision=commit, allow_patterns=patterns, **kw))
    listing = _listing(repo_id, repo_type, path.name, cache_dir)
    names = sorted(filter_repo_objects(listing if listing is not None else _files_on_disk(path),
                                       allow_patterns=patterns))
    if not names:
        raise HubError(f"no file of {what} matches {patterns}: check the patterns against the repo's files")
    return Snapshot(path, repo_id, repo_type, revision, path.name, {n: _file_info(path, n, what) for n in names})


def write_manifest(snapshot: Snapshot, path: str | Path) -> None:
    """Write ``snapshot`` to ``path`` as JSON (atomically)."""
    write_json({"repo_id": snapshot.repo_id, "repo_type": snapshot.repo_type, "revision": snapshot.revision,
                "commit": snapshot.commit, "path": str(snapshot.path),
                "files": {n: {"sha256": f.sha256, "size": f.size} for n, f in snapshot.files.items()}}, path)


def read_manifest(path: str | Path) -> Snapshot:
    """The snapshot a manifest describes, after checking that its files are still there with
    their sizes (a Hub cache moved or cleared since the download is caught here)."""
    try:
        d = json.loads(Path(path).read_text())
        snapshot = Snapshot(Path(d["path"]), d["repo_id"], d["repo_type"], d["revision"], d["commit"],
                            {n: FileInfo(f["sha256"], int(f["size"])) for n, f in d["files"].items()})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a download manifest ({err!r}): delete it and download again") from err
    for name, info in snapshot.files.items():
        file = snapshot.path / name
        if not file.is_file() or file.stat().st_size != info.size:
            raise FileNotFoundError(
                f"{file} of {snapshot.repo_id}@{snapshot.commit} (manifest {path}) is missing or changed: the Hub "
                f"cache was moved or cleared since the download; delete {path} and download again")
    return snapshot


def dataset_split_files(snapshot_path: str | Path, split: str, config: str | None = None) -> list[Path]:
    """The parquet files of ``split`` in a dataset snapshot, sorted. Recognised layouts, the
    config being the folder the files are in (``data`` for a dataset without configs):
    ``<config>/<split>-00000-of-00002.parquet`` (with or without the shard suffix or a
    ``-<hash>`` of push_to_hub, or a ``<prefix>-`` before the split) and the
    refs/convert/parquet branch's ``[<config>/]<split>/0000.parquet``. Without ``config`` the
    split must be in one config only."""
    root = Path(snapshot_path)
    found: dict[tuple[str, str], list[Path]] = {}  # (config, split) -> files
    for file in root.rglob("*.parquet"):
        found.setdefault(_config_and_split(PurePosixPath(file.relative_to(root).as_posix())), []).append(file)
    configs = sorted({c for c, s in found if s == split and (config is None or c == config)})
    if not configs:
        where = f"config {config!r} of " if config is not None else ""
        seen = ", ".join(f"{s} ({c or 'top level'})" for c, s in sorted(found)) or "no parquet files at all"
        raise FileNotFoundError(f"no split {split!r} in {where}the dataset snapshot {root}; found: {seen}")
    if len(configs) > 1:
        raise ValueError(f"split {split!r} is in several configs of {root}: {configs}; give the config")
    return sorted(found[configs[0], split])


def _config_and_split(rel: PurePosixPath) -> tuple[str, str]:
    """(config folder, split) of a parquet file's path in its repo."""
    if rel.stem.isdigit() and len(rel.parts) > 1:  # refs/convert/parquet: [<config>/]<split>/0000.parquet
        return "/".join(rel.parts[:-2]), rel.parts[-2]
    return "/".join(rel.parts[:-1]), _SHARD_SUFFIX.sub("", rel.stem, count=1).rsplit("-", 1)[-1]


def _model_files(names: Sequence[str], what: str) -> list[str]:
    """The files of a model snapshot among the repo's ``names`` (see :func:`download`)."""
    top = [n for n in names if "/" not in n]
    for weights in _WEIGHTS:
        chosen = [n for n in top if weights.fullmatch(n)]
        if chosen:
            return sorted(chosen + [n for n in top if n in MODEL_FILES])
    raise HubError(f"{what} has no weights (model.safetensors or pytorch_model.bin, sharded or not) at its top "
                   f"level; its files: {sorted(names)}. Give allow_patterns to pick other files")


def _listing(repo_id: str, repo_type: str, commit: str, cache_dir: str | Path | None) -> list[str] | None:
    """The repo's file paths at ``commit`` as huggingface_hub cached them (no network), None
    if it holds no listing (a cache filled by another tool or an older version)."""
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=commit,
                                                     cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        return None


def _files_on_disk(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _file_info(folder: Path, name: str, what: str) -> FileInfo:
    """Hash and size of ``folder/name``, checked against the name of the cache blob it links
    to: the sha256 of an LFS file, the git blob hash of any other (no check for copies)."""
    file = folder / name
    blob = Path(os.path.realpath(file))
    expected = blob.name if file.is_symlink() and (_HEX40.fullmatch(blob.name) or _HEX64.fullmatch(blob.name)) \
        else None
    size = blob.stat().st_size
    sha256 = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size) if expected is not None and len(expected) == 40 else None
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
    got = (git or sha256).hexdigest()
    if expected is not None and got != expected:
        raise HubError(f"{name} of {what} in the Hub cache ({blob}) has hash {got}, not the Hub's {expected}: the "
                       f"cache is corrupted; delete that file and download again")
    return FileInfo(sha256.hexdigest(), size)


@contextmanager
def _hub_errors(what: str, page: str, cache_dir: str | Path | None) -> Iterator[None]:
    """Turn huggingface_hub's failures about ``what`` (whose Hub page is ``page``) into the
    :class:`HubError` that says what to do."""
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    unreachable = (f"and {what} is not (completely) in the Hub cache {cache}: check the network and HF_ENDPOINT "
                   f"({constants.ENDPOINT}), or download on a machine with network and copy the cache there (point "
                   "HF_HUB_CACHE at it and set HF_HUB_OFFLINE=1)")
    try:
        yield
    except GatedRepoError as err:  # a RepositoryNotFoundError: first
        raise HubGatedError(
            f"{what} is gated: accept its conditions on {page} with your account, then log in "
            f"(`hf auth login`) or set HF_TOKEN to a token of that account") from err
    except RepositoryNotFoundError as err:
        raise HubRepoNotFoundError(
            f"{what}: no such repo on {constants.ENDPOINT}; check the repo id and type, or for a private repo "
            "log in (`hf auth login`) or set HF_TOKEN") from err
    except RevisionNotFoundError as err:
        raise HubRevisionNotFoundError(
            f"{what}: the repo has no such revision; give an existing branch, tag or full commit hash") from err
    except LocalEntryNotFoundError as err:  # not cached, and the Hub was not asked or did not answer
        if constants.is_offline_mode():
            raise HubOfflineError(
                f"HF_HUB_OFFLINE is set and {what} is not (completely) in the Hub cache {cache}: download it once "
                "with network (HF_HUB_OFFLINE unset), or point HF_HUB_CACHE at a copy of a cache that holds it") \
                from err
        raise HubNetworkError(f"could not reach the Hub ({err.__cause__ or err!r}) {unreachable}") from err
    except httpx2.TransportError as err:  # the connection broke after the files were listed
        raise HubNetworkError(f"lost the connection to the Hub ({err!r}) {unreachable}") from err
    except HfHubHTTPError as err:  # e.g. 401 for a bad token
        raise HubError(f"the Hub refused {what} (HTTP {err.response.status_code}): check HF_TOKEN or log in "
                       f"again (`hf auth login`); it said: {err}") from err
