"""The unseen-task verbs: merges of the seen tasks evaluated on the unseen ones, then the table."""

from __future__ import annotations

import pandas as pd

from pipeline.analysis import unseen as unseen_analysis
from pipeline.analysis.common import write_parquet
from pipeline.commands.loading import finetuned_models, open_store, task_splits
from pipeline.merging import registry
from pipeline.zoo.store import load_clip


def analysis_unseen(zoo: dict, pretrained: str, variant: str, tasks: list[str], seen: list[str], unseen: list[str],
                    heads: list[str], out: str, task_vectors: list[str] = (), finetuned: list[str] = (),
                    data: list[str] = (), lambdas: dict = {}, ties: dict = {}, adamerging: dict = {},  # noqa: B006
                    max_images: int = 0, batch_size: int = 512, budget_mib: float = 1024) -> None:
    """``variant`` "baselines" (Task Arithmetic and TIES of the seen tasks, the store streamed
    within ``budget_mib``) or an AdaMerging variant adapted on all ``tasks``' unlabeled test
    images."""
    splits = task_splits(zoo, tasks, heads, data, "test")
    if variant == "baselines":
        encoder, state, store = open_store(zoo, pretrained, task_vectors)
        table = unseen_analysis.run_baselines(encoder, state, store, splits, unseen, lambdas, ties, batch_size,
                                              budget_mib, zoo["arch"])
    else:
        settings = registry.method(f"adamerging_{variant}").configure(adamerging)
        encoder = load_clip(zoo, pretrained).visual
        table = unseen_analysis.run_adamerging(encoder, load_clip(zoo, pretrained).visual, variant, seen,
                                               list(finetuned_models(finetuned)), splits, unseen, settings, max_images,
                                               batch_size, zoo["arch"])
    write_parquet(table, out)


def analysis_unseen_table(inputs: list[str], out: str, figure: str) -> None:
    """All variants' rows in one table and figure."""
    table = pd.concat([pd.read_parquet(f) for f in inputs], ignore_index=True)
    write_parquet(table, out)
    unseen_analysis.plot_unseen(table, figure)
