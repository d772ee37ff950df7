"""A tiny FusionBench-style CLIP suite in the exact Hugging Face repo layouts, for the local
stand-in Hub: an HF ``CLIPModel`` pretrained repo, one ``CLIPVisionModel`` repo per task
(fine-tuned = pretrained + a task-specific perturbation, no projection, as FusionBench
publishes them) and one parquet dataset repo per task in FusionBench's columns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image

from helpers.hf_clip import clip_model
from pipeline.data import suites

PRETRAINED_REPO = "openai/clip-tiny-test"
FINETUNED_REPO = "tanganke/clip-tiny-test_{hub_name}"


def pretrained_clip(seed: int = 0, full_size: bool = False) -> transformers.CLIPModel:
    """A random CLIPModel: tiny (:func:`helpers.hf_clip.clip_model`), or with ``full_size``
    transformers' default shapes, those of openai/clip-vit-base-patch32."""
    if not full_size:
        return clip_model(seed)
    torch.manual_seed(seed)
    return transformers.CLIPModel(transformers.CLIPConfig()).eval()


def write_model_repos(root: Path, tasks: list[str], seed: int = 0, full_size: bool = False,
                      pretrained_repo: str = PRETRAINED_REPO, finetuned_repo: str = FINETUNED_REPO) -> dict[str, Path]:
    """repo id -> folder (under ``root/models``, the stand-in Hub's layout) of the pretrained
    CLIPModel and of each task's CLIPVisionModel (``finetuned_repo`` with ``{hub_name}``)."""
    clip = pretrained_clip(seed, full_size)
    repos = {pretrained_repo: root / "models" / pretrained_repo}
    clip.save_pretrained(repos[pretrained_repo])
    for i, task in enumerate(tasks):
        vision = transformers.CLIPVisionModel(clip.config.vision_config).eval()
        vision.load_state_dict(clip.vision_model.state_dict())  # transformers 5: the tower is the model
        generator = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(0.02 * p.detach().std().clamp_min(1e-3) * torch.randn(p.shape, generator=generator))
        repo = finetuned_repo.format(hub_name=suites.task(task).hub_name)
        repos[repo] = root / "models" / repo
        vision.save_pretrained(repos[repo])
    return repos


def encoded(rng: np.random.Generator, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def write_dataset_repos(root: Path, tasks: list[str], sizes: dict[str, int], seed: int = 0,
                        image_sizes: dict[str, tuple[int, int]] | None = None, fmt: str = "PNG") -> dict[str, Path]:
    """repo id -> folder (under ``root/datasets``) of each task's dataset,
    ``<config or data>/<split>-00000-of-00001.parquet`` with the task's image and label
    columns (image cells: {bytes, path} structs of random ``fmt`` images, square sides drawn
    in ``image_sizes[task]`` (default 40 x 48 px)."""
    repos = {}
    for i, task in enumerate(tasks):
        spec = suites.task(task)
        rng = np.random.default_rng(seed + i)
        low, high = (image_sizes or {}).get(task, (40, 48))
        folder = root / "datasets" / spec.dataset
        for split, n in sizes.items():
            hub_split = {"train": spec.train_split, "test": spec.test_split}[split]
            labels = rng.integers(0, len(spec.classnames), n)
            sides = rng.integers(low, high + 1, (n, 2))
            images = [{"bytes": encoded(rng, tuple(sides[j]), fmt), "path": f"{j}.{fmt.lower()}"} for j in range(n)]
            table = pa.table({spec.image_column: images, spec.label_column: pa.array(labels, pa.int64())})
            target = folder / (spec.config or "data") / f"{hub_split}-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target, row_group_size=256)
        repos[spec.dataset] = folder
    return repos
