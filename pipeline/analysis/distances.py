"""L2 distances between the pretrained, fine-tuned and merged image encoders, and cosine
similarities between task vectors. Both stream: distances read one tensor of every model at
a time (safetensors), cosines accumulate a K x K Gram matrix over the store's chunks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from pipeline.analysis.common import figure, label, save_figure
from pipeline.models.checkpoints import readable


def _keys(handle, prefix: str) -> dict[str, str]:
    return {k.removeprefix(prefix): k for k in handle.keys() if k.startswith(prefix)}


def l2_distances(models: Mapping[str, str], prefixes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Pairwise L2 distances (a, b, l2) over the floating tensors the models share; model
    ``name`` is the safetensors file ``models[name]`` whose keys start with
    ``prefixes.get(name, "")`` (``"visual."`` for a full CLIP checkpoint)."""
    prefixes = prefixes or {}
    names = list(models)
    handles = {}
    for n in names:
        with readable(models[n]):
            handles[n] = safe_open(str(models[n]), framework="pt")
    keys = {n: _keys(handles[n], prefixes.get(n, "")) for n in names}
    common = [k for k in keys[names[0]] if all(k in keys[n] for n in names)]
    sq = torch.zeros(len(names), len(names), dtype=torch.float64)
    for key in common:
        tensors = [handles[n].get_tensor(keys[n][key]) for n in names]
        if not tensors[0].is_floating_point():
            continue
        flat = torch.stack([t.reshape(-1).double() for t in tensors])
        sq += _pairwise_sq(flat)
    dist = sq.clamp_min(0).sqrt().numpy()
    np.fill_diagonal(dist, 0.0)
    return pd.DataFrame([{"a": a, "b": b, "l2": float(dist[i, j])} for i, a in enumerate(names)
                         for j, b in enumerate(names)])


def _pairwise_sq(flat: torch.Tensor) -> torch.Tensor:
    n = flat.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        out[i] = (flat - flat[i]).pow(2).sum(1)
    return out


def cosine_matrix(store) -> pd.DataFrame:
    """Cosine similarity (a, b, cosine) of every pair of task vectors of ``store``."""
    k = len(store.tasks)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for _, _, block in store.chunks():
        b = block.double()
        gram += b @ b.T
    norm = gram.diagonal().sqrt().clamp_min(1e-30)
    cos = (gram / norm[:, None] / norm[None, :]).numpy()
    return pd.DataFrame([{"a": a, "b": b, "cosine": float(cos[i, j])} for i, a in enumerate(store.tasks)
                         for j, b in enumerate(store.tasks)])


def plot_matrix(table: pd.DataFrame, value: str, path, title: str, cmap: str = "magma_r", fmt: str = "{:.1f}",
                vmin: float | None = None, vmax: float | None = None) -> None:
    """A heatmap of a square (a, b, value) table with the values written in the cells."""
    names = list(dict.fromkeys(table["a"]))
    grid = table.pivot(index="a", columns="b", values=value).reindex(index=names, columns=names).to_numpy()
    size = 0.42 * len(names) + 2.2
    fig, ax = figure(figsize=(size + 1.0, size))
    lo = np.nanmin(grid) if vmin is None else vmin
    hi = np.nanmax(grid) if vmax is None else vmax
    im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi)
    shown = [label(n) for n in names]
    ax.set_xticks(range(len(names)), shown, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), shown)
    for (i, j), v in np.ndenumerate(grid):
        t = (min(max(v, lo), hi) - lo) / (hi - lo + 1e-12)
        if lo < 0 < hi:  # diverging: both ends are dark
            dark_cell = abs(t - 0.5) > 0.3
        else:
            dark_cell = t > 0.55 if cmap.endswith("_r") else t < 0.45
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6 if len(names) > 10 else 7,
                color="white" if dark_cell else "black")
    ax.set_title(title)
    ax.spines[["left", "bottom"]].set_visible(False)
    fig.colorbar(im, ax=ax, shrink=0.8)
    save_figure(fig, path)
