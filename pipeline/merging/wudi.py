"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025).

Per linear layer, the merged update tau_m minimises the interference the task vectors
themselves predict,

    L(tau_m) = sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2,

by ``steps`` steps of Adam (learning rate ``lr``, PyTorch's default betas and eps, no weight
decay) from the Task Arithmetic sum sum_k tau_k, and is added with scale 1. The gradient is
taken in closed form, 2 (tau_m A - B) with A = sum_k tau_k^T tau_k / ||tau_k||^2 (n x n) and
B = sum_k tau_k tau_k^T tau_k / ||tau_k||^2 (m x n), computed once per layer: the same Adam
iterates as autograd on L (up to rounding), at one m x n x n product per step instead of
3K products of m x n x m.

Which tensors are linear layers: the four weight matrices of each transformer block of
open_clip's VisionTransformer (``attn.in_proj_weight``, the fused q/k/v projection,
``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``: the keys the paper's
code, ``wudi_main.py``, optimises; :data:`pipeline.zoo.lora.TARGETS`), not
``positional_embedding`` or ``proj`` (FusionBench's ``wudi_merging`` optimises every 2-D
tensor). Every other tensor gets the mean of the task vectors, as in FusionBench (the
paper's code leaves them at their pretrained values).

Memory: one tensor of all K task vectors, A, B and Adam's two moments, on
``inputs.device`` (CUDA when present); the engine's bar counts the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import PerMatrix, StreamedMerge
from pipeline.zoo.lora import TARGETS


@dataclass(frozen=True)
class Settings:
    """``steps``: 300 and ``lr``: 1e-5, Adam's iterations and learning rate in the paper's code
    (``wudi_main.py``: ``get_redundant_task_vector``, ``args.py`` ``--iter`` default 300;
    FusionBench's ``method/wudi/wudi.yaml`` runs 400)."""

    steps: int = 300
    lr: float = 1e-5

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0:
            raise ValueError(f"WUDI needs steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")


def is_linear(key: str, shape: tuple[int, ...]) -> bool:
    """The weight matrices of the transformer blocks' linear layers."""
    return len(shape) == 2 and TARGETS.search(key) is not None


def loss(merged: torch.Tensor, tvs: torch.Tensor) -> torch.Tensor:
    """sum_k ||(merged - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2 of ``tvs`` (K, m, n)."""
    norms = tvs.square().sum((1, 2))
    return ((merged - tvs) @ tvs.mT).square().sum((1, 2)).div(norms).sum()


def wudi(tvs: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """The WUDI update of K task matrices ``tvs`` (K, m, n): Adam on :func:`loss` from their sum."""
    # a task matrix that is zero (a layer the task left frozen) adds nothing to L: weight 0, not 0/0
    norms = tvs.square().sum((1, 2)).clamp_min(torch.finfo(tvs.dtype).tiny)
    weighted = tvs / norms[:, None, None]
    m, n = tvs.shape[1:]
    gram = weighted.reshape(-1, n).T @ tvs.reshape(-1, n)  # A, one (n, Km) x (Km, n) product
    target = ((weighted @ tvs.mT) @ tvs if m < n else weighted @ (tvs.mT @ tvs)).sum(0)  # B, the cheaper way
    merged = tvs.sum(0)
    adam = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        merged.grad = 2 * (merged @ gram - target)
        adam.step()
    return merged


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + WUDI(task vectors), one tensor of the store at a time."""
    return StreamedMerge(inputs, PerMatrix(partial(wudi, steps=settings.steps, lr=settings.lr), is_linear),
                         desc="WUDI")
