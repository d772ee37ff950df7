"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k% magnitudes (global
over all tensors), elect a sign per entry, merge the agreeing entries (dis-mean or dis-sum),
theta_pre + lambda * merged. Exact semantics: DESIGN section 6 and ``kernels.ties_merge``.

The store is streamed (:mod:`pipeline.store.streaming`): exact thresholds from a sample and
a counting pass, then the fused trim/elect/merge chunk by chunk (Triton on CUDA).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.merging import StateDict, apply_vector, default_device
from pipeline.store.streaming import Ties, merge_to_memory
from pipeline.store.task_vectors import TaskVectorStore

DEFAULT_K = 20
DEFAULT_LAMBDA = 0.3  # the paper's best
MERGES = ("mean", "sum")


def reducer(store: TaskVectorStore, k: float = DEFAULT_K, merge: str = "mean", lam: float = DEFAULT_LAMBDA) -> Ties:
    """``lam`` * TIES(task vectors), for :mod:`pipeline.store.streaming`."""
    if merge not in MERGES:
        raise ValueError(f"TIES merge must be one of {MERGES}, got {merge!r}")
    if not 0 <= k <= 100:
        raise ValueError(f"TIES k must be a percentage in [0, 100], got {k}")
    return Ties(k, merge, lam)


def vector(store: TaskVectorStore, k: float = DEFAULT_K, merge: str = "mean",
           device: torch.device | None = None) -> StateDict:
    """The TIES-merged task vector (dis-``merge``), streamed from the store."""
    return merge_to_memory(store, reducer(store, k, merge, 1.0), device=device or default_device(), desc="TIES")


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore, k: float = DEFAULT_K,
          merge: str = "mean", lam: float = DEFAULT_LAMBDA) -> StateDict:
    """theta_pre + ``lam`` * TIES(task vectors) with top-``k``% trimming."""
    return apply_vector(pretrained, vector(store, k, merge), lam)
