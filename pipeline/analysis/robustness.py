"""Robustness to distribution shift (the paper's Table 5): a merge of a few tasks, its
AdaMerging coefficients learned on the *corrupted* unlabeled test images, evaluated with
Task Arithmetic and TIES on the clean and the corrupted test sets, one job per corruption
("clean": AdaMerging adapted on clean images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from pipeline.analysis.common import figure, label, save_figure

COLUMNS = ["corruption", "severity", "method", "task", "test_set", "accuracy", "n"]
METHODS = ["task_arithmetic", "ties_merging", "adamerging"]


def norm_stats(zoo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the zoo's image normalisation, shaped (1, 3, 1, 1)."""
    if zoo["source"] == "synthetic":
        from pipeline.data.synthetic import MEAN, STD

        mean, std = [MEAN] * 3, [STD] * 3
    else:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def to_uint8(x: torch.Tensor, zoo: dict) -> np.ndarray:
    """Normalised NCHW images back to uint8 NHWC."""
    mean, std = norm_stats(zoo)
    return (x * std + mean).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()


def to_normalised(images: np.ndarray, zoo: dict) -> torch.Tensor:
    mean, std = norm_stats(zoo)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def corrupted_split(dataset, zoo: dict, corruption: str, severity: int, seed: int) -> TensorDataset:
    """``dataset`` (normalised images, labels) with every image corrupted."""
    from pipeline.analysis.corruptions import corrupt
    from pipeline.data.tasks import as_tensors

    x, y = as_tensors(dataset)
    if corruption == "clean":
        return TensorDataset(x, y)
    return TensorDataset(to_normalised(corrupt(to_uint8(x, zoo), corruption, severity, seed), zoo), y)


def evaluate(encoder, state_dict, method: str, sets: dict[str, list], batch_size: int) -> list[dict]:
    from pipeline.evaluation import accuracy

    encoder.load_state_dict(state_dict)
    rows = []
    for test_set, tasks in sets.items():
        for name, head, data in tasks:
            r = accuracy(encoder, head, data, batch_size, desc=f"{method} on {name} ({test_set})")
            rows.append({"method": method, "task": name, "test_set": test_set, "accuracy": r["accuracy"], "n": r["n"]})
    return rows


def adaptation_images(datasets: Sequence, max_images: int, seed: int) -> list[torch.Tensor]:
    """The unlabeled images AdaMerging adapts on: per task at most ``max_images`` (a fixed
    random subset; 0: all)."""
    from pipeline.data.tasks import as_tensors

    out = []
    for d in datasets:
        x = as_tensors(d)[0]
        if 0 < max_images < len(x):
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_images]]
        out.append(x)
    return out


def plot_robustness(table: pd.DataFrame, path) -> None:
    """Average accuracy over the tasks per corruption: one bar per method on the corrupted
    test set (the clean panel shows the clean test set)."""
    avg = table.groupby(["corruption", "method", "test_set"], as_index=False)["accuracy"].mean()
    avg = avg[(avg["test_set"] == "corrupted") | (avg["corruption"] == "clean")]
    corruptions = list(dict.fromkeys(table["corruption"]))
    methods = [m for m in METHODS if m in set(avg["method"])]
    fig, ax = figure(figsize=(1.0 * len(corruptions) + 2.5, 3.0))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        v = avg[avg["method"] == m].set_index("corruption")["accuracy"].reindex(corruptions)
        ax.bar(np.arange(len(corruptions)) + (i - (len(methods) - 1) / 2) * width, v, width,
               label=label(m) if m != "adamerging" else "AdaMerging")
    ax.set_xticks(range(len(corruptions)), [c.replace("_", " ") for c in corruptions], rotation=30, ha="right")
    ax.set_ylabel("Average accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def run(encoder: torch.nn.Module, adapt_encoder: torch.nn.Module, pretrained: dict[str, torch.Tensor], store,
        finetuned: Sequence[dict[str, torch.Tensor]], clean: Sequence[tuple[str, torch.Tensor, object]], zoo: dict,
        corruption: str, severity: int, variant: str, settings, lambdas: dict, ties: dict, max_images: int,
        batch_size: int, budget_mib: float) -> pd.DataFrame:
    """Rows (corruption, severity, method, task, test_set, accuracy, n) of one corruption:
    Task Arithmetic and TIES of ``store`` (``pretrained``: a copy of ``encoder``'s weights) and
    AdaMerging (``settings``) of ``finetuned`` adapted on the corrupted test images with
    ``adapt_encoder``; ``clean``: (task, head, test split) of each task; ``ties``: TIES'
    settings (its ``lam`` replaced by ``lambdas``'); ``budget_mib``: the memory of the
    streamed merges (merging.budget_mib)."""
    from pipeline.merging import task_arithmetic, ties_merging
    from pipeline.merging.adamerging import adamerge
    from pipeline.merging.contract import Inputs, default_device

    tasks = [t for t, _, _ in clean]
    sets = {"clean": list(clean)}
    if corruption != "clean":
        sets["corrupted"] = [(t, h, corrupted_split(d, zoo, corruption, severity, settings.seed)) for t, h, d in clean]
    result = adamerge(variant, adapt_encoder, finetuned, [h for _, h, _ in clean],
                      adaptation_images([d for _, _, d in sets.get("corrupted", clean)], max_images, settings.seed),
                      settings, device=None, progress=False, tasks=tasks, arch=zoo["arch"])
    ta = task_arithmetic.Settings(lam=lambdas["task_arithmetic"])
    ta_merged = task_arithmetic.run(Inputs(pretrained, tasks, store, budget_mib=budget_mib), ta).state_dict()
    rows = evaluate(encoder, ta_merged, "task_arithmetic", sets, batch_size)
    tm = ties_merging.Settings(**{**ties, "lam": lambdas["ties_merging"]})
    merged = ties_merging.run(Inputs(pretrained, tasks, store, device=default_device(), budget_mib=budget_mib,
                                     arch=zoo["arch"]), tm).state_dict()
    rows += evaluate(encoder, merged, "ties_merging", sets, batch_size)
    rows += evaluate(encoder, result.state_dict, "adamerging", sets, batch_size)
    return pd.DataFrame(rows).assign(corruption=corruption, severity=0 if corruption == "clean" else severity)[COLUMNS]
