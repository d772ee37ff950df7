"""The ``decode-images`` verb: one split of a real task decoded once into its image cache."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, Subset

from pipeline.commands.loading import job_seed
from pipeline.data.image_cache import decode_split
from pipeline.data.paper_datasets import load_paper_dataset
from pipeline.models.clip import input_size
from pipeline.zoo.store import register_saved_config

log = logging.getLogger(__name__)


def raw_split(zoo: dict, task: str, split: str, manifest: str = "") -> Dataset:
    """The ``split`` of ``task`` as (PIL RGB image, label) items: from the parquet files of the
    Hub dataset downloaded in ``manifest`` (its split and column names from
    :mod:`pipeline.data.suites`; without a validation split on the Hub, ``val`` is carved from
    train as in the task_vectors code), else from ``zoo["data_root"]``."""
    if not manifest:
        return load_paper_dataset(task, zoo["data_root"], split, None)
    from pipeline.data import suites
    from pipeline.data.paper_datasets import hold_out
    from pipeline.data.parquet_datasets import ParquetSplit
    from pipeline.hub import dataset_split_files, read_manifest

    spec, snapshot = suites.task(task), read_manifest(manifest).path
    hub_split = {"train": spec.train_split, "val": spec.val_split or spec.train_split, "test": spec.test_split}[split]
    data = ParquetSplit(dataset_split_files(snapshot, hub_split, spec.config), spec.image_column, spec.label_column)
    if split == "test" or spec.val_split:
        return data
    train, val = hold_out(len(data))
    return Subset(data, val if split == "val" else train)


def decode_images(zoo: dict, task: str, split: str, out: str, manifest: str = "", model_config: str = "",
                  max_images: int = 0, workers: int = 0) -> None:
    """Decode ``split`` of ``task`` (from the Hub dataset of ``manifest``, else from
    ``zoo["data_root"]``) once into the image-cache folder ``out``: uint8 images at the zoo
    architecture's input size (``model_config``: the zoo's model_config.json, for an
    architecture open_clip does not know), open_clip's eval resize and crop; at most
    ``max_images`` images (0: all; else a seeded random subset), with ``workers`` threads
    (0: as many as --threads)."""
    if model_config:
        register_saved_config(zoo["arch"], model_config)
    image_size = input_size(zoo["arch"])
    dataset = raw_split(zoo, task, split, manifest)
    log.info("%s %s: decoding %d images at %dpx into %s", task, split, len(dataset), image_size, out)
    decode_split(dataset, image_size, out, workers or torch.get_num_threads(), max_images,
                 seed=job_seed(zoo, f"{task}/{split}"))
