"""The ``analysis-coefficients`` verb: the learned AdaMerging coefficients and entropy curves."""

from __future__ import annotations

import pandas as pd

from pipeline.analysis.coefficients import coefficient_table, plot_entropy, plot_layer_wise, plot_task_wise
from pipeline.analysis.common import write_parquet


def analysis_coefficients(lambdas: list[str], entropy: list[str], out: str, layer_figure: str, task_figure: str,
                          entropy_figure: str) -> None:
    """Coefficient table and figures from the AdaMerging runs' ``lambdas`` and ``entropy`` files."""
    table = coefficient_table(pd.concat([pd.read_parquet(f) for f in lambdas], ignore_index=True))
    write_parquet(table, out)
    plot_layer_wise(table, layer_figure)
    plot_task_wise(table, task_figure)
    plot_entropy(pd.concat([pd.read_parquet(f) for f in entropy], ignore_index=True), entropy_figure)
