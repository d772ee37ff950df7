"""Verbs that build the synthetic zoo: task data, contrastive pretraining, fine-tuning, LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.commands.loading import job_seed
from pipeline.data.synthetic import vocabulary
from pipeline.data.tasks import as_tensors, load_split
from pipeline.io import atomic_path, write_json
from pipeline.models.checkpoints import save_state_dict
from pipeline.zoo import synthetic_zoo
from pipeline.zoo.lora import add_adapters, factors
from pipeline.zoo.store import load_clip, load_head

log = logging.getLogger(__name__)


def task_data(zoo: dict, task: str, out: str) -> None:
    """Render the train/val/test splits of one synthetic task (npz)."""
    syn = zoo["synthetic"]
    data = synthetic_zoo.build_task_data(task, zoo["seed"], syn["sizes"], syn["domains"])
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: numpy appends no .npz
        np.savez_compressed(f, **data)
    log.info("task %s: %s", task, {k: v.shape for k, v in data.items()})


def pretrain(zoo: dict, out: str, tokenizer: str) -> None:
    """Pretrain the tiny CLIP contrastively on rendered scenes and captions."""
    cfg = dict(zoo["synthetic"]["pretrain"], arch=zoo["arch"])
    model, tok = synthetic_zoo.pretrain(cfg, zoo["seed"])
    write_json({"words": vocabulary(), "context_length": tok.context_length}, Path(tokenizer))
    save_state_dict(model.state_dict(), out)


def finetune(zoo: dict, task: str, pretrained: str, head: str, data: str, out: str) -> None:
    """Fine-tune the image encoder on one task through its frozen zero-shot head."""
    model = load_clip(zoo, pretrained)
    x, y = as_tensors(load_split(zoo, task, "train", data))
    sd = synthetic_zoo.finetune(model.visual, load_head(head), x, y, zoo["synthetic"]["finetune"],
                                job_seed(zoo, task), desc=f"finetune {task}")
    save_state_dict(sd, out)


def lora_finetune(zoo: dict, task: str, pretrained: str, head: str, data: str, out: str, settings: dict) -> None:
    """Train LoRA adapters of one task (``settings``: rank, alpha and fine-tuning overrides)."""
    encoder = load_clip(zoo, pretrained).visual
    x, y = as_tensors(load_split(zoo, task, "train", data))
    seed = job_seed(zoo, f"lora {task}")
    adapters = add_adapters(encoder, settings["rank"], settings["alpha"], seed)
    cfg = zoo["synthetic"]["finetune"] | {k: v for k, v in settings.items() if k not in ("rank", "alpha")}
    synthetic_zoo.train_encoder(encoder, [(load_head(head), x, y)], cfg, seed, desc=f"LoRA {task}")
    save_state_dict(factors(adapters), out)
