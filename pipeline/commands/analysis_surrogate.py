"""The ``analysis-surrogate`` verb: per-sample entropy against loss (the paper's Fig. 3)."""

from __future__ import annotations

import logging

from pipeline.analysis.common import write_parquet
from pipeline.analysis.surrogate import plot_scatter, sample_table, spearman_table
from pipeline.commands.loading import open_store, task_splits
from pipeline.merging import task_arithmetic
from pipeline.merging.contract import Inputs

log = logging.getLogger(__name__)


def analysis_surrogate(zoo: dict, pretrained: str, task_vectors: list[str], heads: list[str], lambdas: list[float],
                       out: str, figure: str, spearman_out: str, data: list[str] = (), max_samples: int = 0,
                       batch_size: int = 512, budget_mib: float = 1024) -> None:
    """Entropy and cross-entropy of each test sample under Task Arithmetic at ``lambdas`` (the
    store streamed within ``budget_mib``)."""
    encoder, sd, store = open_store(zoo, pretrained, task_vectors)
    vector = task_arithmetic.run(Inputs(sd, store.tasks, store, budget_mib=budget_mib)).vector()
    samples = sample_table(encoder, sd, vector, lambdas, task_splits(zoo, store.tasks, heads, data), batch_size,
                           max_samples)
    spearman = spearman_table(samples)
    write_parquet(samples, out)
    write_parquet(spearman, spearman_out)
    plot_scatter(samples, spearman, figure)
    log.info("Spearman entropy vs loss:\n%s", spearman.to_string())
