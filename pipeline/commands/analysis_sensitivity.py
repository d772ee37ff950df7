"""The ``analysis-sensitivity`` verb: accuracy over the lambda grid (the paper's Fig. 6)."""

from __future__ import annotations

from pipeline.analysis.common import write_parquet
from pipeline.analysis.sensitivity import plot_sensitivity, run


def analysis_sensitivity(zoo: dict, pretrained: str, task_vectors: list[str], heads: list[str], search: list[str],
                         out: str, figure: str, data: list[str] = (), references: list[str] = (),
                         settings: dict = {}, test: bool = False, batch_size: int = 512) -> None:  # noqa: B006
    """The lambda-search curves (``search`` files), with ``test`` also on the test split;
    ``settings``: each searched method's settings."""
    table = run(zoo, pretrained, task_vectors, search, references, heads, data, settings, test, batch_size)
    write_parquet(table, out)
    plot_sensitivity(table, figure)
