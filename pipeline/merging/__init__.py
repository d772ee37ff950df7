"""Merging methods, one module each with one entry function ``merge``.

Methods on task vectors (weight averaging, Task Arithmetic, TIES-Merging, task negation)
stream the K task vectors chunk by chunk from the zarr store
(:class:`pipeline.store.task_vectors.TaskVectorStore`) into one merged task vector, then
add it to the pretrained weights with :func:`apply_vector`. Fisher merging and RegMean need
the fine-tuned models and some training examples; multi-task learning trains jointly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = dict[str, torch.Tensor]

STORE_METHODS = ("weight_averaging", "task_arithmetic", "ties_merging", "task_negation")
DATA_METHODS = ("fisher_merging", "regmean")
SEARCH_METHODS = ("task_arithmetic", "ties_merging")


def apply_vector(pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                 lam: float) -> StateDict:
    """``pretrained + lam * vector`` in fp32 for the keys of ``vector``, cast back to each
    tensor's dtype; the other tensors of ``pretrained`` are kept."""
    out = dict(pretrained)
    for key, v in vector.items():
        base = pretrained[key]
        out[key] = (base.float() + lam * v.to(base.device)).to(base.dtype)
    return out


def default_device() -> torch.device:
    """CUDA when present (Triton kernels), else CPU (torch twins)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
