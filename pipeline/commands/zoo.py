"""Verbs that import a real zoo and build every zoo's zero-shot heads."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.tasks import task_prompts
from pipeline.merging.contract import default_device
from pipeline.models.checkpoints import check_compatible, load_state_dict, save_state_dict
from pipeline.models.clip import zero_shot_weights
from pipeline.models.pretrained import load_pretrained_clip
from pipeline.zoo.store import load_clip, load_tokenizer, save_head


def import_pretrained(zoo: dict, out: str) -> None:
    """The pretrained CLIP (open_clip tag or file) as a full safetensors state dict."""
    model, _, _ = load_pretrained_clip(zoo["arch"], zoo["pretrained"])
    save_state_dict(model.state_dict(), out)


def import_finetuned(zoo: dict, task: str, pretrained: str, out: str) -> None:
    """One fine-tuned encoder (any accepted format), checked against the pretrained one."""
    source = zoo["checkpoints"].format(task=task)
    sd = load_state_dict(source, trust_pickles=zoo["trust_pickles"])
    reference = load_clip(zoo, pretrained).visual.state_dict()
    check_compatible(reference, sd, pretrained, source)
    save_state_dict(sd, out)


def head(zoo: dict, task: str, pretrained: str, out: str) -> None:
    """The zero-shot classification head of one task from its class names and templates."""
    model = load_clip(zoo, pretrained)
    tokenizer = load_tokenizer(zoo, Path(pretrained).parent)
    classnames, templates = task_prompts(zoo, task)
    save_head(zero_shot_weights(model, tokenizer, classnames, templates, device=default_device()), out)
