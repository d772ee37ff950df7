"""Sensitivity of Task Arithmetic and TIES to lambda (the paper's curve): average accuracy
over the tasks at every grid point on the validation split (from the lambda search) and on
the test split, with AdaMerging and traditional multi-task learning as reference lines."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pipeline.analysis.common import figure, label, save_figure

COLUMNS = ["kind", "method", "lambda", "split", "accuracy"]


def test_curve(encoder, pretrained, vector, lambdas, tasks, method: str, batch_size: int = 512) -> pd.DataFrame:
    """Per task accuracy of theta_pre + lambda * vector on the test datasets ``tasks``."""
    from pipeline.merging.lambda_search import search

    rows, _ = search(encoder, pretrained, vector, lambdas, tasks, method, batch_size)
    return pd.DataFrame(rows).assign(split="test")


def sensitivity_table(curves: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Average accuracy over tasks: ``curves`` (method, lambda, task, split, accuracy) per
    method, lambda and split (kind "curve"), ``references`` (eval rows: model, task,
    accuracy on the test split) per model (kind "reference", lambda NaN)."""
    tasks = sorted(curves["task"].unique())
    curve = (curves.groupby(["method", "lambda", "split"], as_index=False)["accuracy"].mean()
             .assign(kind="curve"))
    refs = references[references["task"].isin(tasks)]
    ref = (refs.groupby("model", as_index=False)["accuracy"].mean()
           .rename(columns={"model": "method"}).assign(kind="reference", split="test"))
    ref["lambda"] = float("nan")
    return pd.concat([curve, ref], ignore_index=True)[COLUMNS]


def plot_sensitivity(table: pd.DataFrame, path) -> None:
    """One panel per split: a curve per method; the references as horizontal lines (test)."""
    splits = [s for s in ("val", "test") if s in set(table["split"][table["kind"] == "curve"])]
    fig, axes = figure(1, len(splits), figsize=(4.2 * len(splits), 3.2), squeeze=False, sharey=True)
    curves, refs = table[table["kind"] == "curve"], table[table["kind"] == "reference"]
    styles = ["-", "--", ":", "-."]
    for ax, split in zip(axes[0], splits):
        for method, part in curves[curves["split"] == split].groupby("method"):
            part = part.sort_values("lambda")
            ax.plot(part["lambda"], part["accuracy"], marker="o", ms=3, label=label(method))
            best = part.loc[part["accuracy"].idxmax()]
            ax.plot([best["lambda"]], [best["accuracy"]], "k*", ms=7)
        if split == "test":
            for i, (_, r) in enumerate(refs.iterrows()):
                ax.axhline(r["accuracy"], color=f"C{i + 2}", ls=styles[i % len(styles)], lw=1,
                           label=label(r["method"]))
        ax.set_xlabel(r"$\lambda$")
        ax.set_title({"val": "Validation split (lambda search)", "test": "Test split"}[split])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Average accuracy (%)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    save_figure(fig, path)


def run(zoo: dict, pretrained: str, store_paths: Sequence[str], search_files: Sequence[str],
        reference_files: Sequence[str], heads: Sequence[str], data: Sequence[str], settings: dict,
        test: bool, batch_size: int) -> pd.DataFrame:
    """The sensitivity table from the lambda-search files (validation) and, with ``test``,
    the same grid evaluated on the test split."""
    from pathlib import Path

    from pipeline.analysis.common import load_encoder, task_splits
    from pipeline.merging import registry
    from pipeline.merging.contract import Inputs, default_device
    from pipeline.models.checkpoints import state_dict_hash
    from pipeline.store.task_vectors import TaskVectorStore

    val = pd.concat([pd.read_parquet(f) for f in search_files], ignore_index=True)
    parts = [val]
    if test:
        tasks = [Path(p).name for p in store_paths]
        encoder, sd = load_encoder(zoo, pretrained)
        store = TaskVectorStore(Path(store_paths[0]).parent, tasks, base_hash=state_dict_hash(sd))
        splits = task_splits(zoo, tasks, heads, data, "test")
        for method, grid in val.groupby("method"):
            spec = registry.method(method)
            inputs = Inputs(sd, tasks, store, device=default_device())
            vector = spec.run(inputs, spec.configure(settings.get(method, {}))).vector()
            parts.append(test_curve(encoder, sd, vector, sorted(grid["lambda"].unique()), splits, method, batch_size))
    refs = pd.concat([pd.read_parquet(f) for f in reference_files], ignore_index=True) if reference_files else \
        pd.DataFrame(columns=["model", "task", "accuracy"])
    return sensitivity_table(pd.concat(parts, ignore_index=True), refs)
