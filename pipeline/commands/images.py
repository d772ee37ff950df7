"""The ``decode-images`` verb: one split of a real task decoded once into its image cache."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from pipeline.commands.loading import job_seed
from pipeline.data.image_cache import decode_split
from pipeline.data.paper_datasets import load_paper_dataset
from pipeline.models.clip import input_size

log = logging.getLogger(__name__)


def raw_split(zoo: dict, task: str, split: str) -> Dataset:
    """The ``split`` of ``task`` as (PIL RGB image, label) items, from ``zoo["data_root"]``."""
    return load_paper_dataset(task, zoo["data_root"], split, None)


def decode_images(zoo: dict, task: str, split: str, out: str, max_images: int = 0, workers: int = 0) -> None:
    """Decode ``split`` of ``task`` once into the image-cache folder ``out`` (uint8 images at
    the zoo architecture's input size, open_clip's eval resize and crop), at most
    ``max_images`` images (0: all; else a seeded random subset), with ``workers`` threads
    (0: as many as --threads)."""
    image_size = input_size(zoo["arch"])
    dataset = raw_split(zoo, task, split)
    log.info("%s %s: decoding %d images at %dpx into %s", task, split, len(dataset), image_size, out)
    decode_split(dataset, image_size, out, workers or torch.get_num_threads(), max_images,
                 seed=job_seed(zoo, f"{task}/{split}"))
