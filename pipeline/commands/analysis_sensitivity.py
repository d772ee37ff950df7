"""The ``analysis-sensitivity`` verb: accuracy over the lambda grid (the paper's Fig. 6)."""

from __future__ import annotations

import pandas as pd

from pipeline.analysis.common import write_parquet
from pipeline.analysis.sensitivity import plot_sensitivity, run
from pipeline.commands.loading import open_store, task_splits
from pipeline.merging import registry
from pipeline.merging.contract import Inputs, default_device


def analysis_sensitivity(zoo: dict, pretrained: str, task_vectors: list[str], heads: list[str], search: list[str],
                         out: str, figure: str, data: list[str] = (), references: list[str] = (),
                         settings: dict = {}, test: bool = False, batch_size: int = 512,  # noqa: B006
                         budget_mib: float = 1024) -> None:
    """The lambda-search curves (``search`` files), with ``test`` also on the test split (the
    store streamed within ``budget_mib``); ``settings``: each searched method's settings."""
    val = pd.concat([pd.read_parquet(f) for f in search], ignore_index=True)
    refs = pd.concat([pd.read_parquet(f) for f in references], ignore_index=True) if references else \
        pd.DataFrame(columns=["model", "task", "accuracy"])
    on_test = None
    if test:
        encoder, state, store = open_store(zoo, pretrained, task_vectors)
        vectors = {}
        for method in sorted(set(val["method"])):
            spec = registry.method(method)
            inputs = Inputs(state, store.tasks, store, device=default_device(), budget_mib=budget_mib,
                            arch=zoo["arch"])
            vectors[method] = spec.run(inputs, spec.configure(settings.get(method, {}))).vector()
        on_test = (encoder, state, vectors, task_splits(zoo, store.tasks, heads, data, "test"))
    table = run(val, refs, on_test, batch_size)
    write_parquet(table, out)
    plot_sensitivity(table, figure)
