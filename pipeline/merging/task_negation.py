"""Task negation (Ilharco et al., 2023): theta_pre + lambda * sum_k tau_k with lambda < 0,
which makes the model forget the negated tasks (open the store with those tasks only)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.merging import StateDict, task_arithmetic
from pipeline.store.streaming import Linear
from pipeline.store.task_vectors import TaskVectorStore

DEFAULT_LAMBDA = -1.0


def reducer(store: TaskVectorStore, lam: float = DEFAULT_LAMBDA) -> Linear:
    """``lam`` * sum_k tau_k with ``lam`` < 0, for :mod:`pipeline.store.streaming`."""
    if lam >= 0:
        raise ValueError(f"task negation needs a negative lambda, got {lam}; use task_arithmetic to add tasks")
    return task_arithmetic.reducer(store, lam)


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore, lam: float = DEFAULT_LAMBDA) -> StateDict:
    """Subtract ``-lam`` times the store's task vectors from the pretrained weights."""
    reducer(store, lam)  # checks lam
    return task_arithmetic.merge(pretrained, store, lam)
