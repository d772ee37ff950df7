"""Entropy as a surrogate objective: per test sample, the Shannon entropy of a merged
model's prediction and its cross-entropy loss against the label (Task Arithmetic at several
lambdas), and their Spearman rank correlation per task and lambda (the paper's Figure 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from pipeline.analysis.common import figure, save_figure
from pipeline.models.clip import logits

SAMPLE_COLUMNS = ["lambda", "task", "sample", "entropy", "loss", "correct"]
SPEARMAN_COLUMNS = ["lambda", "task", "spearman", "pvalue", "n"]


@torch.no_grad()
def per_sample(encoder: torch.nn.Module, head: torch.Tensor, dataset, batch_size: int = 512) -> pd.DataFrame:
    """Entropy, cross-entropy loss and correctness of every sample of ``dataset``."""
    encoder.eval()
    ent, loss, correct = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        z = logits(encoder(x), head)
        logp = z.log_softmax(1)
        ent.append(-(logp.exp() * logp).sum(1))
        loss.append(F.nll_loss(logp, y, reduction="none"))
        correct.append(z.argmax(1) == y)
    return pd.DataFrame({"sample": np.arange(len(dataset)), "entropy": torch.cat(ent).numpy(),
                         "loss": torch.cat(loss).numpy(), "correct": torch.cat(correct).numpy()})


def sample_table(encoder, pretrained, vector, lambdas: Sequence[float], tasks, batch_size: int = 512,
                 max_samples: int = 0) -> pd.DataFrame:
    """Per-sample rows for theta_pre + lambda * vector at every ``lambdas`` on ``tasks``
    ((name, head, dataset)), at most ``max_samples`` per task (0: all)."""
    from torch.utils.data import Subset

    from pipeline.merging.contract import apply_vector

    parts = []
    for lam in lambdas:
        encoder.load_state_dict(apply_vector(pretrained, vector, lam))
        for name, head, data in tasks:
            if 0 < max_samples < len(data):
                data = Subset(data, range(max_samples))
            parts.append(per_sample(encoder, head, data, batch_size).assign(**{"lambda": float(lam), "task": name}))
    return pd.concat(parts, ignore_index=True)[SAMPLE_COLUMNS]


def spearman_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rank correlation of entropy and loss per lambda and task, and pooled over
    the tasks (task "all") per lambda."""
    rows = []
    for lam, by_lam in samples.groupby("lambda"):
        for task, part in list(by_lam.groupby("task", sort=False)) + [("all", by_lam)]:
            res = spearmanr(part["entropy"], part["loss"])
            rows.append({"lambda": float(lam), "task": task, "spearman": float(res.statistic),
                         "pvalue": float(res.pvalue), "n": len(part)})
    return pd.DataFrame(rows, columns=SPEARMAN_COLUMNS)


def plot_scatter(samples: pd.DataFrame, spearman: pd.DataFrame, path, max_points: int = 400) -> None:
    """One panel per task: loss against entropy, one colour per lambda, rho in the legend."""
    tasks = list(dict.fromkeys(samples["task"]))
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = figure(rows, cols, figsize=(2.7 * cols, 2.4 * rows), squeeze=False)
    rho = spearman.set_index(["lambda", "task"])["spearman"]
    for ax, task in zip(axes.flat, tasks):
        part = samples[samples["task"] == task]
        for i, (lam, sub) in enumerate(part.groupby("lambda")):
            sub = sub.iloc[:: max(1, len(sub) // max_points)]
            ax.scatter(sub["entropy"], sub["loss"], s=4, alpha=0.45, color=f"C{i}",
                       label=rf"$\lambda$={lam:g} ($\rho$={rho[(lam, task)]:.2f})", rasterized=True)
        ax.set_title(task)
        ax.set_xlabel("entropy")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend(frameon=False, fontsize=6, markerscale=2)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("cross-entropy loss")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    save_figure(fig, path)
