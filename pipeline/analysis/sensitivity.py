"""Sensitivity of Task Arithmetic and TIES to lambda (the paper's curve): average accuracy
over the tasks at every grid point on the validation split (from the lambda search) and on
the test split, with AdaMerging and traditional multi-task learning as reference lines."""

from __future__ import annotations

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

