"""The ``analysis-sensitivity`` verbs: accuracy over the lambda grid (the paper's Fig. 6)."""

from __future__ import annotations

import pandas as pd

from pipeline.analysis.common import write_parquet
from pipeline.analysis.sensitivity import plot_sensitivity, sensitivity_table, test_curve
from pipeline.commands.loading import open_store, task_splits
from pipeline.merging.contract import Inputs, default_device
from pipeline.merging.lambda_search import grid as lambda_grid
from pipeline.merging.lambda_search import searched_method


def analysis_sensitivity_test(zoo: dict, method: str, pretrained: str, task_vectors: list[str], heads: list[str],
                              grid: dict, out: str, data: list[str] = (), settings: dict = {},  # noqa: B006
                              batch_size: int = 512, budget_mib: float = 1024) -> None:
    """The test curve of a searched ``method``: per task test accuracy of its merge at every
    lambda of ``grid`` (start, stop, step; the lambda search's grid), the store streamed
    within ``budget_mib``."""
    spec = searched_method("analysis-sensitivity-test", method)
    encoder, state, store = open_store(zoo, pretrained, task_vectors)
    vector = spec.run(Inputs(state, store.tasks, store, device=default_device(), budget_mib=budget_mib,
                             arch=zoo["arch"]), spec.configure(settings)).vector()
    splits = task_splits(zoo, store.tasks, heads, data, "test")
    write_parquet(test_curve(encoder, state, vector, lambda_grid(**grid), splits, method, batch_size), out)


def analysis_sensitivity(search: list[str], out: str, figure: str, test_curves: list[str] = (),
                         references: list[str] = ()) -> None:
    """The sensitivity table and figure: the validation curves of the lambda searches
    (``search`` files), the ``test_curves`` of ``analysis-sensitivity-test``, and the reference
    accuracies (eval files: AdaMerging, multi-task learning) as lines."""
    curves = pd.concat([pd.read_parquet(f) for f in [*search, *test_curves]], ignore_index=True)
    refs = pd.concat([pd.read_parquet(f) for f in references], ignore_index=True) if references else \
        pd.DataFrame(columns=["model", "task", "accuracy"])
    table = sensitivity_table(curves, refs)
    write_parquet(table, out)
    plot_sensitivity(table, figure)
