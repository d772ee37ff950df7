"""Task Arithmetic (Ilharco et al., 2023): theta_pre + lambda * sum_k tau_k."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.merging import StateDict, apply_vector
from pipeline.store.streaming import Linear, merge_to_memory
from pipeline.store.task_vectors import TaskVectorStore

DEFAULT_LAMBDA = 0.3  # the paper's choice when no validation data is used


def reducer(store: TaskVectorStore, lam: float = DEFAULT_LAMBDA) -> Linear:
    """``lam`` * sum_k tau_k, for :mod:`pipeline.store.streaming`."""
    return Linear([lam] * len(store.tasks))


def vector(store: TaskVectorStore) -> StateDict:
    """The sum of the task vectors, streamed from the store."""
    return merge_to_memory(store, reducer(store, 1.0), desc="task arithmetic")


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore, lam: float = DEFAULT_LAMBDA) -> StateDict:
    """Add ``lam`` times the sum of the task vectors to the pretrained weights."""
    return apply_vector(pretrained, vector(store), lam)
