"""Weight averaging: the element-wise mean of the fine-tuned weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge(pretrained: dict[str, torch.Tensor], finetuned: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of the fine-tuned state dicts (non-float tensors are taken from ``pretrained``)."""
    return {
        k: torch.stack([sd[k].float() for sd in finetuned]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in pretrained.items()
    }
