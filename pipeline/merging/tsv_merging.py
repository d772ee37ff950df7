"""TSV-M, Task Singular Vectors Merging (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025).

Per weight matrix, task k's update tau_k = U_k S_k V_k^T keeps its top r = min(m, n) // K
singular triplets (a 1/K share of the rank each). The kept left vectors of all tasks are
concatenated into U = [U_1[:, :r] ... U_K[:, :r]] (m x Kr), the singular values into S and
the right vectors into V (n x Kr). U and V are then decorrelated by their orthogonal
Procrustes solution, the polar factor: U_perp = P Q^T for U = P Sigma Q^T, the orthonormal
matrix closest to U (likewise V_perp), and the merged update is
alpha * U_perp diag(S) V_perp^T.

Which tensors are matrices: every 2-D tensor of the store, as the paper's code
(``compute_and_sum_svd_mem_reduction``: ``len(shape) == 2`` and not the text projection,
which the image encoder lacks) and FusionBench's ``TaskSingularVectorMerging`` select them:
for open_clip's VisionTransformer the four matrices of each block (``attn.in_proj_weight``,
the fused q/k/v projection, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
``mlp.c_proj.weight``) and also ``positional_embedding`` and ``proj``. Every other tensor
(biases, LayerNorms, ``class_embedding``, the 4-D ``conv1.weight``) gets alpha times the
mean of the task vectors, as in both codes (Task Arithmetic with lambda alpha / K).

On purpose, against FusionBench: r is ``min(m, n) // K`` (FusionBench's
``int(min(m, n) * (1 / K))`` is one less where the float product rounds down, e.g. K = 49),
and the bases hold only the Kr kept columns, where FusionBench pads them with zero columns up
to min(m, n) before the polar factor; the padded columns meet zero singular values, so the
merged matrices agree up to rounding (benchmarks/bench_successors_svd.py measures it). A
matrix with fewer than K singular values keeps none (a zero update, as in FusionBench).

Memory: one tensor of all K task vectors, its K thin SVDs and the concatenated bases, on
``inputs.device`` (``torch.linalg``; CUDA when present).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import PerMatrix, StreamedMerge


@dataclass(frozen=True)
class Settings:
    """``alpha``: 1.0, the scaling of the merged update (FusionBench's config
    ``method/task_singular_vector/TaskSingularVectorMerging.yaml``, ``alpha: 1``; TSV-M
    needs no coefficient search)."""

    alpha: float = 1.0


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``x`` (batched as torch.linalg.svd). LAPACK's gesdd (torch's CPU driver)
    can fail to converge on matrices with many repeated singular values, such as a task
    matrix with the common subspace projected out (Iso-CTS on ViT-B/32): then the SVD is taken
    in float64 and cast back."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        return tuple(t.to(x.dtype) for t in torch.linalg.svd(x.double(), full_matrices=False))


def polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor P Q^T of ``x`` = P Sigma Q^T: the matrix with orthonormal columns (or
    rows, for a wide ``x``) nearest to ``x`` in Frobenius norm (orthogonal Procrustes)."""
    p, _, qh = svd(x)
    return p @ qh


def bases(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_perp (m, Kr), S (Kr,), V_perp^T (Kr, n)) of K task matrices ``tvs`` (K, m, n): each
    task's top r = min(m, n) // K singular triplets, tasks in order, the bases decorrelated."""
    k, m, n = tvs.shape
    r = min(m, n) // k
    u, s, vh = svd(tvs)  # (K, m, p), (K, p), (K, p, n)
    u_cat = u[:, :, :r].transpose(0, 1).reshape(m, k * r)
    vh_cat = vh[:, :r, :].reshape(k * r, n)
    return polar(u_cat), s[:, :r].reshape(k * r), polar(vh_cat)


def tsv_merge(tvs: torch.Tensor) -> torch.Tensor:
    """The TSV-M update U_perp diag(S) V_perp^T of K task matrices ``tvs`` (K, m, n)."""
    u, s, vh = bases(tvs)
    return (u * s) @ vh


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``alpha`` * TSV-M(task vectors), one tensor of the store at a time."""
    return StreamedMerge(inputs, PerMatrix(tsv_merge), settings.alpha, desc="TSV-M")
