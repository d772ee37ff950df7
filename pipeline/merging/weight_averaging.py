"""Weight averaging: the element-wise mean of the fine-tuned weights, computed as
theta_pre + mean_k tau_k from the task-vector store."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.merging import StateDict, apply_vector
from pipeline.store.task_vectors import TaskVectorStore, assemble


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore) -> StateDict:
    """Mean of the fine-tuned encoders (non-float tensors are taken from ``pretrained``)."""
    return apply_vector(pretrained, assemble(store, lambda block: block.mean(0), progress="weight averaging"), 1.0)
