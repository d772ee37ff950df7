"""Verbs that import a real zoo and build every zoo's zero-shot heads."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.tasks import task_prompts
from pipeline.models.checkpoints import check_compatible, load_state_dict, save_state_dict
from pipeline.models.clip import zero_shot_weights
from pipeline.models.pretrained import load_pretrained_clip
from pipeline.zoo.store import load_clip, load_tokenizer, save_head, save_model_config


def import_pretrained(zoo: dict, source: str, out: str) -> None:
    """The pretrained CLIP from ``source`` (a local file, a Hugging Face CLIPModel directory or
    an open_clip tag) as a full safetensors state dict, its open_clip model config beside it."""
    model, _, _ = load_pretrained_clip(zoo["arch"], source)
    save_model_config(zoo["arch"], out)  # first: the weights file marks a finished import
    save_state_dict(model.state_dict(), out)


def import_finetuned(zoo: dict, task: str, pretrained: str, checkpoint: str, out: str) -> None:
    """The fine-tuned encoder of ``task`` from ``checkpoint`` (any accepted file or Hugging Face
    directory), checked against the pretrained one, whose projection stands in for a missing
    one."""
    reference = load_clip(zoo, pretrained).visual.state_dict()
    sd = load_state_dict(checkpoint, trust_pickles=zoo["trust_pickles"], pretrained_visual=reference)
    check_compatible(reference, sd, pretrained, f"{checkpoint} ({task})")
    save_state_dict(sd, out)


def head(zoo: dict, task: str, pretrained: str, out: str) -> None:
    """The zero-shot classification head of one task from its class names and templates."""
    model = load_clip(zoo, pretrained)
    tokenizer = load_tokenizer(zoo, Path(pretrained).parent)
    classnames, templates = task_prompts(zoo, task)
    save_head(zero_shot_weights(model, tokenizer, classnames, templates), out)
