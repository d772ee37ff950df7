"""AdaMerging's learned coefficients: layer-wise lambdas grouped by transformer block
(heatmaps, blocks x tasks), task-wise lambdas (bars), and the entropy curves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.analysis.common import figure, label, save_figure

COLUMNS = ["variant", "task", "group", "order", "value", "min", "max", "tensors"]


def coefficient_table(lambdas: pd.DataFrame) -> pd.DataFrame:
    """The final coefficients (last logged step) per variant, task and group: a transformer
    block ("block i"), the tensors before the first block ("stem") or after the last
    ("head"), or "all" for task-wise variants; value is the mean over the group's tensors."""
    last = lambdas[lambdas["step"] == lambdas.groupby("variant")["step"].transform("max")].copy()
    groups, orders = [], []
    for _, part in last.groupby("variant", sort=False):
        blocks = part["block"].dropna()
        first = part.loc[blocks.index, "segment"].min() if len(blocks) else None
        for _, r in part.iterrows():
            if r["tensor"] is None or (isinstance(r["tensor"], float) and np.isnan(r["tensor"])):
                groups.append("all"), orders.append(0)
            elif not pd.isna(r["block"]):
                groups.append(f"block {int(r['block'])}"), orders.append(int(r["block"]) + 1)
            elif first is None or r["segment"] < first:
                groups.append("stem"), orders.append(0)
            else:
                groups.append("head"), orders.append(10_000)
    last["group"], last["order"] = groups, orders
    table = (last.groupby(["variant", "task", "group", "order"], sort=False)["value"]
             .agg(value="mean", min="min", max="max", tensors="count").reset_index())
    return table.sort_values(["variant", "order"], kind="stable")[COLUMNS].reset_index(drop=True)


def _tasks(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["task"]))


def plot_layer_wise(table: pd.DataFrame, path) -> None:
    """One heatmap per layer-wise variant: rows groups (stem, blocks, head), columns tasks."""
    variants = [v for v in ("layer_wise", "layer_wise_plus") if v in set(table["variant"])]
    variants += sorted(set(table["variant"][table["group"] != "all"]) - set(variants))
    if not variants:
        fig, ax = figure(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no layer-wise variant", ha="center")
        save_figure(fig, path)
        return
    tasks = _tasks(table)
    fig, axes = figure(1, len(variants), figsize=(0.55 * len(tasks) * len(variants) + 2.4, 3.6), squeeze=False)
    vmax = table.loc[table["variant"].isin(variants), "value"].max()
    fig.subplots_adjust(wspace=0.08)
    for i, (ax, variant) in enumerate(zip(axes[0], variants)):
        part = table[table["variant"] == variant]
        groups = list(dict.fromkeys(part.sort_values("order", kind="stable")["group"]))
        grid = part.pivot_table(index="group", columns="task", values="value").reindex(index=groups, columns=tasks)
        im = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=max(vmax, 1e-6), aspect="auto")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(groups)), groups if i == 0 else [])
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if v < 0.6 * vmax else "black")
        ax.set_title(label(f"adamerging_{variant}"))
        ax.spines[["left", "bottom"]].set_visible(False)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=r"$\lambda$ (mean over the group's tensors)")
    save_figure(fig, path)


def plot_task_wise(table: pd.DataFrame, path) -> None:
    """Grouped bars: one group per task, one bar per task-wise variant."""
    part = table[table["group"] == "all"]
    variants = list(dict.fromkeys(part["variant"]))
    tasks = _tasks(table)
    fig, ax = figure(figsize=(max(4.0, 0.6 * len(tasks) + 2), 2.8))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        v = part[part["variant"] == variant].set_index("task")["value"].reindex(tasks)
        ax.bar(np.arange(len(tasks)) + (i - (len(variants) - 1) / 2) * width, v, width, label=label(f"adamerging_{variant}"))
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel(r"$\lambda_k$")
    ax.grid(axis="y", alpha=0.3)
    if variants:
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(variants))
    save_figure(fig, path)


def plot_entropy(entropy: pd.DataFrame, path) -> None:
    """The entropy loss per step of every variant (a light moving average over the raw curve)."""
    fig, ax = figure(figsize=(5, 2.8))
    for i, (variant, part) in enumerate(entropy.groupby("variant", sort=False)):
        part = part.sort_values("step")
        ax.plot(part["step"], part["entropy"], color=f"C{i}", alpha=0.25, lw=0.8)
        smooth = part["entropy"].rolling(max(1, len(part) // 25), min_periods=1).mean()
        ax.plot(part["step"], smooth, color=f"C{i}", lw=1.5, label=label(f"adamerging_{variant}"))
    ax.set_xlabel("step")
    ax.set_ylabel("entropy loss (sum over tasks)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    save_figure(fig, path)
