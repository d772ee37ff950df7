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

from pipeline.data import suites

# The real CLIP vocabulary and context (open_clip's tokenizer applies), tiny widths.
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, hidden_act="quick_gelu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu")
PRETRAINED_REPO = "openai/clip-tiny-test"
FINETUNED_REPO = "tanganke/clip-tiny-test_{hub_name}"


def pretrained_clip(seed: int = 0) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    return transformers.CLIPModel(config).eval()


def write_model_repos(root: Path, tasks: list[str], seed: int = 0) -> dict[str, Path]:
    """repo id -> folder (under ``root/models``, the stand-in Hub's layout) of the pretrained
    CLIPModel and of each task's CLIPVisionModel."""
    clip = pretrained_clip(seed)
    repos = {PRETRAINED_REPO: root / "models" / PRETRAINED_REPO}
    clip.save_pretrained(repos[PRETRAINED_REPO])
    for i, task in enumerate(tasks):
        vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
        vision.load_state_dict(clip.vision_model.state_dict())  # transformers 5: the tower is the model
        generator = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        repo = FINETUNED_REPO.format(hub_name=suites.task(task).hub_name)
        repos[repo] = root / "models" / repo
        vision.save_pretrained(repos[repo])
    return repos


def png(rng: np.random.Generator, size: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_dataset_repos(root: Path, tasks: list[str], sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """repo id -> folder (under ``root/datasets``) of each task's dataset,
    ``<config or data>/<split>-00000-of-00001.parquet`` with the task's image and label
    columns (image cells: {bytes, path} structs)."""
    repos = {}
    for i, task in enumerate(tasks):
        spec = suites.task(task)
        rng = np.random.default_rng(seed + i)
        folder = root / "datasets" / spec.dataset
        for split, n in sizes.items():
            hub_split = {"train": spec.train_split, "test": spec.test_split}[split]
            labels = rng.integers(0, len(spec.classnames), n)
            images = [{"bytes": png(rng, 40), "path": f"{j}.png"} for j in range(n)]
            table = pa.table({spec.image_column: images, spec.label_column: pa.array(labels, pa.int64())})
            target = folder / (spec.config or "data") / f"{hub_split}-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target)
        repos[spec.dataset] = folder
    return repos
