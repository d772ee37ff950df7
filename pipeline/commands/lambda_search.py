"""The ``lambda-search`` verb: the methods whose lambda is chosen on the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.commands.loading import open_store, task_splits
from pipeline.io import write_json, write_parquet
from pipeline.merging.contract import Inputs, apply_vector, default_device
from pipeline.merging.lambda_search import grid as lambda_grid
from pipeline.merging.lambda_search import search, searched_method
from pipeline.models.checkpoints import save_state_dict

log = logging.getLogger(__name__)


def lambda_search(zoo: dict, method: str, pretrained: str, task_vectors: list[str], heads: list[str],
                  grid: dict, search_out: str, out: str, data: list[str] = (), settings: dict = {},  # noqa: B006
                  batch_size: int = 512, budget_mib: float = 1024) -> None:
    """Merge with a searched method at every lambda of ``grid`` (start, stop, step), keep each
    one's validation accuracy and write the best one's encoder."""
    spec = searched_method("lambda-search", method)
    encoder, state, store = open_store(zoo, pretrained, task_vectors)
    config, lambdas = spec.configure(settings), lambda_grid(**grid)
    vector = spec.run(Inputs(state, store.tasks, store, device=default_device(), budget_mib=budget_mib,
                             arch=zoo["arch"]), config).vector()
    val = task_splits(zoo, store.tasks, heads, data, "val")
    rows, best = search(encoder, state, vector, lambdas, val, method, batch_size)
    log.info("%s: best lambda %s on validation", method, best)
    write_parquet(pd.DataFrame(rows), search_out)
    save_state_dict(apply_vector(state, vector, best), out)
    write_json({"method": method, "settings": {**settings, "lam": best}, "lambda_grid": lambdas,
                "tasks": store.tasks, **store.describe()}, Path(out).with_suffix(".json"))
