"""Traditional multi-task learning: the pretrained image encoder fine-tuned jointly on all
tasks' training data, each task through its frozen zero-shot head (synthetic zoos, where
the training data is at hand). Same optimiser and schedule as the per-task fine-tuning of
:func:`pipeline.zoo.synthetic_zoo.finetune`; each step takes one batch per task and
minimises the mean of the tasks' cross-entropies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.data.tasks import as_tensors
from pipeline.merging.contract import Inputs, MergedState
from pipeline.zoo.synthetic_zoo import train_encoder


@dataclass(frozen=True)
class Settings:
    """The per-task fine-tuning schedule, so that joint and individual training compare
    (defaults: the demo zoo's ``zoo.synthetic.finetune``; the workflow passes the zoo's own)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 3.5e-4
    weight_decay: float = 0.0
    warmup: int = 20


def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
    """Train ``inputs.encoder`` on every task's training split through its head."""
    tasks = [(head, *as_tensors(data)) for head, data in zip(inputs.heads, inputs.train, strict=True)]
    state = train_encoder(inputs.encoder, tasks, dataclasses.asdict(settings), inputs.seed,
                          desc="multi-task learning", progress=inputs.progress)
    return MergedState(state)
