"""Helpers shared by the analyses: atomic parquet writes, the figure style, model loading."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.io import write_parquet  # noqa: E402,F401 (the analyses' parquet writer)

STYLE = {
    "font.family": "serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
}

LABELS = {"zeroshot": "Zero-shot", "individual": "Individual", "pretrained": "Pretrained"}  # models, not methods


def label(name: str) -> str:
    """Display name of a model or method (methods: their registry label)."""
    from pipeline.merging.registry import METHODS

    if name in LABELS:
        return LABELS[name]
    if name in METHODS:
        return METHODS[name].label
    if name.startswith("finetuned_"):
        return f"FT {name.removeprefix('finetuned_')}"
    return name


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def figure(*args, **kwargs):
    """``plt.subplots`` in the report's style."""
    plt.rcParams.update(STYLE)
    return plt.subplots(*args, **kwargs)


def load_encoder(zoo: dict, pretrained: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The pretrained image encoder and a copy of its state dict (not views of its weights)."""
    from pipeline.zoo.store import load_clip

    encoder = load_clip(zoo, pretrained).visual
    return encoder, {k: v.clone() for k, v in encoder.state_dict().items()}


def task_splits(zoo: dict, tasks: Sequence[str], heads: Sequence[str], data: Sequence[str] | None,
                split: str = "test") -> list[tuple[str, torch.Tensor, torch.utils.data.Dataset]]:
    """(task, head, dataset) of each task's ``split``."""
    from pipeline.data.tasks import load_split
    from pipeline.zoo.store import load_head

    data = list(data) if data else [None] * len(tasks)
    return [(t, load_head(h), load_split(zoo, t, split, d)) for t, h, d in zip(tasks, heads, data, strict=True)]
