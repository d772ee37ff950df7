"""Merging methods, one module each; ``merge_state_dicts`` dispatches by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.merging import task_arithmetic, weight_averaging

METHODS = {
    "weight_averaging": weight_averaging.merge,
    "task_arithmetic": task_arithmetic.merge,
}


def merge_state_dicts(method: str, pretrained: dict[str, torch.Tensor],
                      finetuned: Sequence[dict[str, torch.Tensor]], **settings) -> dict[str, torch.Tensor]:
    """Merge fine-tuned image-encoder state dicts of one pretrained model with ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown merging method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method](pretrained, finetuned, **settings)
