"""Choose the scaling coefficient lambda of a merged task vector on validation data.

Every grid point's merged encoder theta_pre + lambda * tau is evaluated on the validation
split of every task; all points are kept, and the lambda with the best average accuracy wins
(the smallest one on a tie).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.evaluation import accuracy
from pipeline.merging import registry
from pipeline.merging.contract import Method, apply_vector


def grid(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ..., stop (inclusive, rounded to 10 decimals)."""
    if step <= 0 or stop < start:
        raise ValueError(f"lambda grid needs step > 0 and stop >= start, got {start}..{stop} step {step}")
    return [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]


def searched_method(verb: str, method: str) -> Method:
    """The registry entry of ``method`` if its lambda is searched; any other method is refused,
    the error naming ``verb`` and the searched methods."""
    spec = registry.method(method)
    if not spec.searched:
        raise ValueError(f"{verb}: {method} has no searched lambda; searched: {registry.names(searched=True)}")
    return spec


def search(encoder: nn.Module, pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
           lambdas: Sequence[float], tasks: Sequence[tuple[str, torch.Tensor, Dataset]], method: str,
           batch_size: int = 512) -> tuple[list[dict], float]:
    """Rows (method, lambda, task, split, accuracy) for every grid point and task on the
    validation datasets ``tasks`` (name, head, dataset), and the best lambda."""
    if not lambdas:
        raise ValueError("the lambda grid is empty")
    rows, means = [], []
    for lam in tqdm(lambdas, desc=f"{method} lambda search", mininterval=2):
        encoder.load_state_dict(apply_vector(pretrained, vector, lam))
        accs = []
        for name, head, data in tasks:
            acc = accuracy(encoder, head, data, batch_size, desc=f"lambda {lam} on {name}")["accuracy"]
            rows.append({"method": method, "lambda": lam, "task": name, "split": "val", "accuracy": acc})
            accs.append(acc)
        means.append(sum(accs) / len(accs))
    return rows, lambdas[means.index(max(means))]
