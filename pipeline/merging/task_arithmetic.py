"""Task Arithmetic (Ilharco et al., 2023): theta_pre + lambda * sum_k (theta_k - theta_pre)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_LAMBDA = 0.3


def merge(pretrained: dict[str, torch.Tensor], finetuned: Sequence[dict[str, torch.Tensor]],
          lam: float = DEFAULT_LAMBDA) -> dict[str, torch.Tensor]:
    """Add ``lam`` times the sum of the task vectors to the pretrained weights; a negative
    ``lam`` negates the tasks (task negation)."""
    out = {}
    for k, v in pretrained.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        total = torch.zeros_like(v, dtype=torch.float32)
        for sd in finetuned:
            total += sd[k].float() - v.float()
        out[k] = (v.float() + lam * total).to(v.dtype)
    return out
