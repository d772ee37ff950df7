"""Atomic writes of small result files: a temporary file beside the target, then a rename,
so a killed job never leaves a partial file that a later run trusts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """Write ``table`` to ``path`` (parquet, no index)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` to ``path`` as indented, key-sorted JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
