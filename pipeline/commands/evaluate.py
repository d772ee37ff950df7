"""The ``evaluate`` verb: top-1 accuracy of one encoder on each task's split, into parquet."""

from __future__ import annotations

import itertools
import logging

import pandas as pd

from pipeline.data.tasks import load_split
from pipeline.evaluation import accuracy
from pipeline.io import write_parquet
from pipeline.merging import registry
from pipeline.merging.contract import default_device
from pipeline.zoo.store import load_clip, load_encoder_state, load_head

log = logging.getLogger(__name__)


def evaluate(zoo: dict, pretrained: str, model: str, method: str, tasks: list[str], heads: list[str], out: str,
             encoder: str | None = None, data: list[str] = (), split: str = "test", batch_size: int = 512,
             device: str = "auto") -> None:
    """Accuracy of ``encoder`` (default: the pretrained one) on ``tasks`` on ``device`` (auto:
    CUDA when present); one row per task. A task-routed ``method`` (its registry entry has a
    ``route``) encodes each task with that task's model, built from the saved merge."""
    image_encoder = load_clip(zoo, pretrained).visual
    image_encoder.to(default_device() if device == "auto" else device)
    spec = registry.METHODS.get(method)
    if spec is not None and spec.route is not None:
        encoders = spec.route(encoder, image_encoder, tasks)
    else:
        if encoder:
            image_encoder.load_state_dict(load_encoder_state(encoder))
        encoders = itertools.repeat(image_encoder)
    rows = []
    pairs = zip(tasks, heads, data or [None] * len(tasks), strict=True)
    for (task, head, data_file), task_encoder in zip(pairs, encoders):  # one split in memory
        dataset = load_split(zoo, task, split, data_file)
        r = accuracy(task_encoder, load_head(head), dataset, batch_size, desc=f"{model} on {task}")
        rows.append({"model": model, "method": method, "task": task, "split": split, **r})
        log.info("%s on %s: %.2f%% (n=%d)", model, task, r["accuracy"], r["n"])
    write_parquet(pd.DataFrame(rows), out)
