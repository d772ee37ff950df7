"""The robustness verbs: one corruption's merges and evaluation, then the table of all."""

from __future__ import annotations

import pandas as pd

from pipeline.analysis.common import write_parquet
from pipeline.analysis.robustness import plot_robustness, run
from pipeline.commands.loading import finetuned_models, open_store, task_splits
from pipeline.merging import registry
from pipeline.zoo.store import load_clip


def analysis_robustness(zoo: dict, pretrained: str, task_vectors: list[str], finetuned: list[str],
                        heads: list[str], corruption: str, out: str, data: list[str] = (), severity: int = 3,
                        variant: str = "layer_wise", lambdas: dict = {}, ties: dict = {},  # noqa: B006
                        adamerging: dict = {}, max_images: int = 0, batch_size: int = 512,  # noqa: B006
                        budget_mib: float = 1024) -> None:
    """Task Arithmetic, TIES and AdaMerging (adapted on the corrupted images) of the tasks of
    ``task_vectors``, evaluated on the clean and the ``corruption`` test sets; the store is
    streamed within ``budget_mib``."""
    encoder, state, store = open_store(zoo, pretrained, task_vectors, finetuned)
    clean = task_splits(zoo, store.tasks, heads, data, "test")
    settings = registry.method(f"adamerging_{variant}").configure(adamerging)
    table = run(encoder, load_clip(zoo, pretrained).visual, state, store, list(finetuned_models(finetuned)), clean, zoo,
                corruption, severity, variant, settings, lambdas, ties, max_images, batch_size, budget_mib)
    write_parquet(table, out)


def analysis_robustness_table(inputs: list[str], out: str, figure: str) -> None:
    """All corruptions' rows in one table and figure."""
    table = pd.concat([pd.read_parquet(f) for f in inputs], ignore_index=True)
    write_parquet(table, out)
    plot_robustness(table, figure)
