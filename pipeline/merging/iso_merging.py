"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025).

Iso-C, per weight matrix: the Task Arithmetic sum M = sum_k tau_k = U S V^T gets a flat
spectrum, alpha * mean(S) U V^T (every singular value replaced by their mean).

Iso-CTS, per weight matrix with p = min(m, n): the common subspace is the top c singular
directions of M, c = p - K s with s = round((p - floor(f p)) / K) task-specific directions
per task (f, ``common_space_fraction``; so the p - c task-specific ones split evenly over the
K tasks). Each task's update with the common subspace projected out, tau_k - U_c U_c^T tau_k,
gives its top s singular triplets, which are orthogonal to the common subspace. The common
and task-specific left vectors are concatenated into an m x p basis, the right vectors into
a p x n one, both replaced by their polar factors (:func:`pipeline.merging.tsv_merging.polar`,
as in TSV-M), and the merged update is alpha * mean(all kept singular values) U V^T.

Which tensors are matrices: every 2-D tensor of the store, as in the paper's code (adapted
from TSV's) and FusionBench's ``iso_c``/``iso_cts`` (see :mod:`pipeline.merging.tsv_merging`:
the four matrices of each block, ``positional_embedding`` and ``proj``); every other tensor
gets alpha times the mean of the task vectors, as there. Where ``round`` makes K s exceed
p (only for tiny matrices, or f near 0), s is cut to p // K; FusionBench's slicing would
then misplace columns.

Memory: one tensor of all K task vectors, the projected copy and its thin SVDs, on
``inputs.device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import PerMatrix, StreamedMerge
from pipeline.merging.tsv_merging import polar, svd


@dataclass(frozen=True)
class IsoCSettings:
    """``alpha``: 1.5, FusionBench's scaling factor for Iso-C on CLIP ViT-B/32 and ViT-L/14
    with eight tasks (its docs/algorithms/isotropic_merging.md; the paper selects alpha on
    held-out validation data)."""

    alpha: float = 1.5


@dataclass(frozen=True)
class IsoCTSSettings:
    """``alpha``: 1.5, FusionBench's scaling factor for Iso-CTS on CLIP ViT-B/32 with eight
    tasks (its docs/algorithms/isotropic_merging.md; the paper selects alpha on held-out
    validation data); ``common_space_fraction``: 0.8, the value of the paper's code (its
    README's Iso-CTS command and ``config/method/iso_cts.yaml``) and of FusionBench's
    ``method/isotropic_merging/iso_cts.yaml``."""

    alpha: float = 1.5
    common_space_fraction: float = 0.8

    def __post_init__(self):
        if not 0 <= self.common_space_fraction <= 1:
            raise ValueError(f"Iso-CTS common_space_fraction must be in [0, 1], got {self.common_space_fraction}")


def iso_c(tvs: torch.Tensor) -> torch.Tensor:
    """mean(S) U V^T of the sum of K task matrices ``tvs`` (K, m, n) = U S V^T."""
    u, s, vh = svd(tvs.sum(0))
    return s.mean() * (u @ vh)


def subspace_sizes(p: int, k: int, fraction: float) -> tuple[int, int]:
    """(common directions, task-specific directions per task) of a rank-p matrix and K tasks."""
    per_task = min(round((p - int(p * fraction)) / k), p // k)
    return p - k * per_task, per_task


def subspaces(tvs: torch.Tensor, fraction: float) -> tuple[torch.Tensor, ...]:
    """The common subspace (U_c (m, c), S_c (c,), V_c^T (c, n)) of the sum of ``tvs`` (K, m, n)
    and the task-specific one (U_t (m, Ks), S_t (Ks,), V_t^T (Ks, n)), tasks in order: each
    task's top s directions once the common subspace is projected out."""
    k, m, n = tvs.shape
    common, per_task = subspace_sizes(min(m, n), k, fraction)
    u, s, vh = svd(tvs.sum(0))
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    ut, st, vht = svd(tvs - uc @ (uc.T @ tvs))
    return (uc, sc, vhc, ut[:, :, :per_task].transpose(0, 1).reshape(m, k * per_task),
            st[:, :per_task].reshape(-1), vht[:, :per_task, :].reshape(k * per_task, n))


def iso_cts(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """mean(S) U V^T over the common and task-specific subspaces of ``tvs`` (K, m, n), their
    bases orthogonalised together."""
    uc, sc, vhc, ut, st, vht = subspaces(tvs, fraction)
    u, vh = polar(torch.cat([ut, uc], 1)), polar(torch.cat([vht, vhc], 0))
    return torch.cat([st, sc]).mean() * (u @ vh)


def run_iso_c(inputs: Inputs, settings: IsoCSettings = IsoCSettings()) -> StreamedMerge:
    """theta_pre + ``alpha`` * Iso-C(task vectors), one tensor of the store at a time."""
    return StreamedMerge(inputs, PerMatrix(iso_c), settings.alpha, desc="Iso-C")


def run_iso_cts(inputs: Inputs, settings: IsoCTSSettings = IsoCTSSettings()) -> StreamedMerge:
    """theta_pre + ``alpha`` * Iso-CTS(task vectors), one tensor of the store at a time."""
    return StreamedMerge(inputs, PerMatrix(partial(iso_cts, fraction=settings.common_space_fraction)),
                         settings.alpha, desc="Iso-CTS")
