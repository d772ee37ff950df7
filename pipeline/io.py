"""Atomic writes: every output of the pipeline is written under a temporary name beside the
target and renamed into place (:func:`atomic_path`), so a killed job never leaves a partial
file or folder that a later run trusts; the temporaries a killed job leaves are removed by the
next write of the same output. This module imports nothing of the pipeline, so every
layer may use it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it for a
    moment would affect files other threads create meanwhile)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicPath:
    """A temporary file (or, with ``directory``, folder) ``{dir}/{prefix}<random>.tmp`` for
    ``path``, created at once; :meth:`commit` renames it onto ``path`` with the permissions of
    a plain ``open``/``mkdir`` (0o666 or 0o777 less the umask, where mkstemp and mkdtemp give
    0o600 and 0o700), :meth:`discard` removes it. ``dir`` defaults to the target's folder and
    ``prefix`` to ``.{name}.``; parent folders are created. Committing a folder replaces an
    existing folder at ``path`` (removed just before the rename). Used as a context manager it
    yields the temporary path and commits on success, discards on any exception.

    ``exclusive``: no other process writes ``path`` meanwhile (Snakemake runs one job per
    output), so temporaries of ``path`` already there (``{prefix}<random>.tmp``: a killed or
    crashed earlier write) are removed first; pass False where concurrent writers may race."""

    def __init__(self, path: str | Path, directory: bool = False, *, dir: str | Path | None = None,
                 prefix: str | None = None, exclusive: bool = True):
        self.path, self.directory = Path(path), directory
        where = Path(dir) if dir is not None else self.path.parent
        where.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.path.name}." if prefix is None else prefix
        if exclusive:
            _remove_stale_temporaries(where, prefix)
        if directory:
            self.tmp = Path(tempfile.mkdtemp(dir=where, prefix=prefix, suffix=".tmp"))
        else:
            fd, tmp = tempfile.mkstemp(dir=where, prefix=prefix, suffix=".tmp")
            os.close(fd)
            self.tmp = Path(tmp)

    def commit(self) -> Path:
        """Publish the temporary path as ``path`` (removing it instead if that fails)."""
        try:
            os.chmod(self.tmp, (0o777 if self.directory else 0o666) & ~_umask())
            if self.directory and self.path.is_dir():
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Remove the temporary path, whatever is left of it; never raises."""
        if self.directory:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _remove_stale_temporaries(where: Path, prefix: str) -> None:
    """Remove the files and folders ``{prefix}<random>.tmp`` in ``where``: the temporaries of
    one output (the random part has no dot, so an output whose name extends this one's, such
    as ``x.json`` of ``x``, keeps its own)."""
    pattern = re.compile(re.escape(prefix) + r"[^.]+\.tmp")
    with os.scandir(where) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            log.info("removed %s, left by an earlier write that did not finish", entry.path)


def atomic_path(path: str | Path, directory: bool = False, *, dir: str | Path | None = None,
                prefix: str | None = None, exclusive: bool = True) -> AtomicPath:
    """``with atomic_path(out) as tmp: write(tmp)``: write ``tmp``, which becomes ``out`` when
    the block succeeds and is removed when it raises (see :class:`AtomicPath`)."""
    return AtomicPath(path, directory, dir=dir, prefix=prefix, exclusive=exclusive)


def write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """Write ``table`` to ``path`` (parquet, no index)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` to ``path`` as indented, key-sorted JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
