"""One entry point to every task's splits, synthetic (npz written by the zoo build) or real
(the paper's datasets through torchvision or local folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pipeline.data.synthetic import to_tensor

SPLITS = ("train", "val", "test")


def load_split(zoo: dict, task: str, split: str, data_file: str | Path | None = None) -> Dataset:
    """The ``split`` of ``task`` as a Dataset of (normalised image tensor, label): from the
    task's npz file for synthetic zoos, from ``zoo["data_root"]`` for real ones."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if zoo["source"] == "synthetic":
        path = Path(data_file or f"{task}.npz")
        if not path.exists():
            raise FileNotFoundError(
                f"synthetic task data {path} is missing; it is built by the workflow "
                f"(snakemake {path})"
            )
        with np.load(path) as npz:
            return TensorDataset(to_tensor(npz[f"x_{split}"]), torch.from_numpy(npz[f"y_{split}"]))
    import open_clip

    from pipeline.data.paper_datasets import load_paper_dataset

    cfg = open_clip.get_model_config(zoo["arch"])
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    return load_paper_dataset(task, zoo["data_root"], split, transform)


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of a dataset as two tensors (TensorDatasets without a copy)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def task_prompts(zoo: dict, task: str) -> tuple[list[str], list[str]]:
    """Class names and prompt templates of a task (synthetic catalogue or the paper's datasets)."""
    if zoo["source"] == "synthetic":
        from pipeline.data.synthetic import ATTRIBUTES

        if task not in ATTRIBUTES:
            raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(ATTRIBUTES)}")
        return ATTRIBUTES[task].classnames, ATTRIBUTES[task].templates
    from pipeline.data.paper_datasets import classnames, templates

    return classnames(task, zoo.get("data_root")), templates(task)
