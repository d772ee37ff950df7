"""Traditional multi-task learning: the pretrained image encoder fine-tuned jointly on all
tasks' training data, each task through its frozen zero-shot head (synthetic zoos, where
the training data is at hand). Same optimiser and schedule as the per-task fine-tuning of
:func:`pipeline.zoo.synthetic_zoo.finetune`; each step takes one batch per task and
minimises the mean of the tasks' cross-entropies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.merging import StateDict
from pipeline.zoo.synthetic_zoo import train_encoder


def merge(encoder: nn.Module, tasks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cfg: dict,
          seed: int, progress: bool = True) -> StateDict:
    """Train ``encoder`` on ``tasks`` (head, images, labels) with the fine-tuning ``cfg``
    (steps, batch_size, lr, weight_decay, warmup); returns its state dict."""
    return train_encoder(encoder, tasks, cfg, seed, desc="multi-task learning", progress=progress)
