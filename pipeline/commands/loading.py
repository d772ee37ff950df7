"""Loading shared by the commands: stores, encoders, heads, splits, fine-tuned models."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.data.tasks import load_split, unlabeled
from pipeline.zoo.store import load_clip, load_encoder_state, load_head


class Lazy(Sequence):
    """A sequence that loads item ``i`` with ``load(sources[i])`` on each access, so that one
    fine-tuned model at a time is in memory."""

    def __init__(self, sources: Sequence[str], load: Callable[[str], Any]):
        self.sources, self.load = list(sources), load

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return self.load(self.sources[i])


def job_seed(zoo: dict, name: str) -> int:
    """A seed of its own for the job ``name`` (a task, ...), derived from the zoo's seed."""
    return zoo["seed"] * 100_003 + zlib.crc32(name.encode()) % 100_000


def open_store(zoo: dict, pretrained: str, task_vectors: Sequence[str], finetuned: Sequence[str] = ()):
    """(pretrained image encoder, a copy of its state dict, the store over ``task_vectors``:
    task subgroups of one zarr store). ``finetuned``: the tasks' fine-tuned checkpoints, in
    the same order, checked to be those the task vectors were computed from (one SHA-256 of
    each file)."""
    from pipeline.models.checkpoints import state_dict_hash  # zarr only for the verbs that read stores
    from pipeline.store.task_vectors import TaskVectorStore

    roots = {Path(p).parent for p in task_vectors}
    if len(roots) != 1:
        raise ValueError(f"--task-vectors must be subgroups of one store, got folders {sorted(map(str, roots))}")
    model = load_clip(zoo, pretrained)
    state = {k: v.clone() for k, v in model.visual.state_dict().items()}  # not views of the encoder's weights
    tasks = [Path(p).name for p in task_vectors]
    store = TaskVectorStore(roots.pop(), tasks, base_hash=state_dict_hash(state))
    if finetuned and len(finetuned) != len(tasks):
        raise ValueError(f"{len(finetuned)} --finetuned checkpoints for {len(tasks)} --task-vectors; pass one per task")
    for task, path in zip(tasks, finetuned):
        store.verify_source(task, path)
    return model.visual, state, store


def splits(zoo: dict, tasks: Sequence[str], data: Sequence[str], split: str) -> list:
    """Each task's ``split`` (``data``: the synthetic task files, or real tasks' image-cache
    folders; empty: real tasks decoded through torchvision)."""
    return [load_split(zoo, t, split, d) for t, d in zip(tasks, data or [None] * len(tasks), strict=True)]


def task_splits(zoo: dict, tasks: Sequence[str], heads: Sequence[str], data: Sequence[str],
                split: str = "test") -> list[tuple[str, torch.Tensor, Any]]:
    """(task, head, split) of each task."""
    return list(zip(tasks, heads_of(heads), splits(zoo, tasks, data, split), strict=True))


def unlabeled_test_images(zoo: dict, tasks: Sequence[str], data: Sequence[str], max_images: int, seed: int,
                          log=None) -> list:
    """Each task's unlabeled test images (at most ``max_images``, a seeded random subset; 0:
    all), read on access (:func:`pipeline.data.tasks.unlabeled`)."""
    images = []
    for task, split in zip(tasks, splits(zoo, tasks, data, "test")):
        rows = None
        if 0 < max_images < len(split):
            rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:max_images]
        images.append(unlabeled(split, rows))
        if log is not None:
            log.info("task %s: %d unlabeled test images", task, len(images[-1]))
    return images


def heads_of(paths: Sequence[str]) -> list[torch.Tensor]:
    return [load_head(p) for p in paths]


def finetuned_models(paths: Sequence[str]) -> Lazy:
    return Lazy(paths, load_encoder_state)
