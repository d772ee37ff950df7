"""One entry point to every task's splits, synthetic (npz written by the zoo build) or real
(the paper's datasets, from their image caches or through torchvision or local folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from pipeline.data.image_cache import DecodedImages, UnlabeledImages
from pipeline.data.synthetic import to_tensor
from pipeline.models.clip import input_size

SPLITS = ("train", "val", "test")


def load_split(zoo: dict, task: str, split: str, data_file: str | Path | None = None) -> Dataset:
    """The ``split`` of ``task`` as a Dataset of (normalised image tensor, label).

    Synthetic zoos: from the task's npz file ``data_file`` (``x_{split}``, ``y_{split}``).
    Real zoos: with ``data_file``, from the task's image-cache folder, one cache per split
    written by ``decode-images`` (:mod:`pipeline.data.image_cache`)::

        {data_file}/{split}/images.npy, labels.npy, indices.npy, meta.json

    read memory-mapped as :class:`~pipeline.data.image_cache.DecodedImages`; without it,
    decoded on every access from ``zoo["data_root"]`` through torchvision."""
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
    if data_file is not None:
        cache = DecodedImages(Path(data_file) / split)
        image_size = input_size(zoo["arch"], missing_ok=True)  # None: an architecture this job has not registered yet
        if image_size is not None and cache.image_size != image_size:
            raise ValueError(f"image cache {cache.path} holds {cache.image_size}px images but "
                             f"{zoo['arch']} takes {image_size}px; decode it again")
        return cache
    image_size = input_size(zoo["arch"])
    import open_clip

    from pipeline.data.paper_datasets import load_paper_dataset

    return load_paper_dataset(task, zoo["data_root"], split, open_clip.image_transform(image_size, is_train=False))


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of a dataset as two tensors (TensorDatasets without a copy, image
    caches in one read)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, DecodedImages):
        return dataset[:]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def unlabeled(dataset: Dataset, rows: torch.Tensor | None = None) -> torch.Tensor | UnlabeledImages:
    """The images of ``dataset`` (only ``rows``, in that order, when given) as AdaMerging reads
    them: ``len()`` and indexing by a 1-D LongTensor -> float (B, 3, S, S). An image cache gives
    a view that reads the sampled rows from disk; other datasets are stacked into one tensor
    (TensorDatasets without rows: their own tensor)."""
    if isinstance(dataset, DecodedImages):
        return UnlabeledImages(dataset, rows)
    if rows is not None:
        dataset = Subset(dataset, rows.tolist())
    return as_tensors(dataset)[0]


def task_prompts(zoo: dict, task: str) -> tuple[list[str], list[str]]:
    """Class names and prompt templates of a task: the synthetic catalogue's; for Hub datasets
    the suite's (:mod:`pipeline.data.suites`, in the Hub datasets' label order); for datasets
    under ``data_root`` the paper datasets' (SUN397 and Cars in their data's label order)."""
    if zoo["source"] == "synthetic":
        from pipeline.data.synthetic import ATTRIBUTES

        if task not in ATTRIBUTES:
            raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(ATTRIBUTES)}")
        return ATTRIBUTES[task].classnames, ATTRIBUTES[task].templates
    if "datasets" in zoo:
        from pipeline.data.suites import task as task_spec

        spec = task_spec(task)
        return list(spec.classnames), list(spec.templates)
    from pipeline.data.paper_datasets import classnames, templates

    return classnames(task, zoo.get("data_root")), templates(task)
