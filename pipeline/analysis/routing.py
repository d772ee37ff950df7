"""WEMoE's routing weights: per task of the images, one heatmap of the mean routing weight
of each routed block (rows) and expert (columns)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from pipeline.analysis.common import figure, save_figure


def plot_routing(table: pd.DataFrame, path) -> None:
    """``table``: rows task, block, expert, weight (:func:`pipeline.merging.wemoe.routing_table`)."""
    tasks = list(dict.fromkeys(table["task"]))
    experts = list(dict.fromkeys(table["expert"]))
    blocks = sorted(set(table["block"]))
    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig, axes = figure(rows, cols, figsize=(0.32 * len(experts) * cols + 2.2, 0.22 * len(blocks) * rows + 1.2 * rows),
                       squeeze=False)
    lo, hi = float(table["weight"].min()), float(table["weight"].max())
    im = None
    for n, ax in enumerate(axes.flat):
        if n >= len(tasks):
            ax.axis("off")
            continue
        grid = table[table["task"] == tasks[n]].pivot_table(index="block", columns="expert", values="weight")
        grid = grid.reindex(index=blocks, columns=experts).to_numpy()
        im = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6), aspect="auto")
        ax.set_title(f"images of {tasks[n]}")
        ax.set_xticks(range(len(experts)), experts if n >= len(tasks) - cols else [], rotation=60, ha="right")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks] if n % cols == 0 else [])
        ax.spines[["left", "bottom"]].set_visible(False)
        k = tasks[n]
        if k in experts:  # the expert of the images' own task
            j = experts.index(k)
            ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(blocks), fill=False, edgecolor="white", linewidth=1.2))
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="mean routing weight (rows: blocks, columns: experts)")
    save_figure(fig, path)


def routing_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per task of the images: the mean weight of its own expert and of the others'."""
    own = table["task"] == table["expert"]
    out = pd.DataFrame({"own expert": table[own].groupby("task", sort=False)["weight"].mean(),
                        "other experts": table[~own].groupby("task", sort=False)["weight"].mean()})
    out.index.name = "images of"
    return out.astype(np.float64)
