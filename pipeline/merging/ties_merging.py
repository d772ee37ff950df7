"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k% magnitudes (global
over all tensors), elect a sign per entry, merge the agreeing entries (dis-mean or dis-sum),
theta_pre + lambda * merged. Exact semantics: DESIGN section 6 and ``kernels.ties_merge``.

The store is streamed: the threshold of each task is selected over that task's chunks only
(one task vector at a time on CPU, radix select over chunks with Triton on CUDA), then the
majority sign and the fused trim/elect/merge run chunk by chunk over all K tasks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kernels import TiesStats, ties_apply, ties_majority, ties_thresholds
from pipeline.merging import StateDict, apply_vector, default_device
from pipeline.store.task_vectors import TaskVectorStore, assemble

DEFAULT_K = 20
DEFAULT_LAMBDA = 0.3  # the paper's best
MERGES = ("mean", "sum")


def stats(store: TaskVectorStore, k: float = DEFAULT_K, device: torch.device | None = None) -> TiesStats:
    """Per-task thresholds and the majority sign over the whole store."""
    device = device or default_device()

    def chunks(tasks=None):
        return lambda: (block for _, _, block in store.chunks(device, tasks))

    thresholds = torch.cat([ties_thresholds(chunks([t]), k) for t in store.tasks])
    return TiesStats(thresholds, ties_majority(chunks(), thresholds))


def vector(store: TaskVectorStore, k: float = DEFAULT_K, merge: str = "mean",
           device: torch.device | None = None) -> StateDict:
    """The TIES-merged task vector (dis-``merge``), streamed from the store."""
    if merge not in MERGES:
        raise ValueError(f"TIES merge must be one of {MERGES}, got {merge!r}")
    device = device or default_device()
    s = stats(store, k, device)
    return assemble(store, lambda block: ties_apply(block, s, merge), device, progress="TIES")


def merge(pretrained: Mapping[str, torch.Tensor], store: TaskVectorStore, k: float = DEFAULT_K,
          merge: str = "mean", lam: float = DEFAULT_LAMBDA) -> StateDict:
    """theta_pre + ``lam`` * TIES(task vectors) with top-``k``% trimming."""
    return apply_vector(pretrained, vector(store, k, merge), lam)
