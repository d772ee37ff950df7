"""Traditional multi-task learning: the pretrained image encoder fine-tuned jointly on all
tasks' training data, each task through its frozen zero-shot head (synthetic zoos, where
the training data is at hand). Same optimiser and schedule as the per-task fine-tuning of
:func:`pipeline.zoo.synthetic_zoo.finetune`; each step takes one batch per task and
minimises the mean of the tasks' cross-entropies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.merging import StateDict
from pipeline.models.clip import logits
from pipeline.zoo.synthetic_zoo import _lr_lambda


def merge(encoder: nn.Module, tasks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cfg: dict,
          seed: int, progress: bool = True) -> StateDict:
    """Train ``encoder`` on ``tasks`` (head, images, labels) with the fine-tuning ``cfg``
    (steps, batch_size, lr, weight_decay, warmup); returns its state dict."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"], cfg["steps"]))
    encoder.train()
    bar = tqdm(range(cfg["steps"]), desc="multi-task learning", disable=not progress, mininterval=2)
    for _ in bar:
        loss = 0.0
        for head, x, y in tasks:
            idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=gen)
            loss = loss + F.cross_entropy(logits(encoder(x[idx]), head), y[idx]) / len(tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    encoder.eval()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}
