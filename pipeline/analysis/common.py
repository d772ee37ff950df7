"""Helpers shared by the analyses: atomic parquet writes, the figure style, display names."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
