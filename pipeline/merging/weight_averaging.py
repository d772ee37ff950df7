"""Weight averaging: the element-wise mean of the fine-tuned weights, computed as
theta_pre + mean_k tau_k from the task-vector store."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.merging import StateDict, apply_vector
from pipeline.store.streaming import Linear, merge_to_memory
from pipeline.store.task_vectors import TaskVectorStore


def reducer(store: TaskVectorStore) -> Linear:
    """mean_k tau_k, for :mod:`pipeline.store.streaming`."""
    return Linear([1.0 / len(store.tasks)] * len(store.tasks))


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore) -> StateDict:
    """Mean of the fine-tuned encoders (non-float tensors are taken from ``pretrained``)."""
    return apply_vector(pretrained, merge_to_memory(store, reducer(store), desc="weight averaging"), 1.0)
