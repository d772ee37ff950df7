"""Verbs that import a real zoo and build every zoo's zero-shot heads."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.tasks import task_prompts
from pipeline.merging.contract import default_device
from pipeline.models.checkpoints import check_compatible, load_state_dict, save_state_dict
from pipeline.models.clip import zero_shot_weights
from pipeline.models.pretrained import load_pretrained_clip
from pipeline.zoo.store import load_clip, load_tokenizer, save_head, save_model_config


def downloaded(source: str, manifest: str, what: str) -> str:
    """``source``, or the snapshot folder of a download ``manifest`` (exactly one of them)."""
    if bool(source) == bool(manifest):
        raise ValueError(f"{what}: give either a source path or the --manifest of its download, not both or neither")
    if source:
        return source
    from pipeline.hub import read_manifest

    return str(read_manifest(manifest).path)


def import_pretrained(zoo: dict, out: str, source: str = "", manifest: str = "") -> None:
    """The pretrained CLIP from ``source`` (a local file, a Hugging Face CLIPModel directory or
    an open_clip tag) or from the Hub snapshot of ``manifest``, as a full safetensors state
    dict with its open_clip model config beside it."""
    model, _, _ = load_pretrained_clip(zoo["arch"], downloaded(source, manifest, "import-pretrained"))
    save_model_config(zoo["arch"], out)  # first: the weights file marks a finished import
    save_state_dict(model.state_dict(), out)


def import_finetuned(zoo: dict, task: str, pretrained: str, out: str, checkpoint: str = "",
                     manifest: str = "") -> None:
    """The fine-tuned encoder of ``task`` from ``checkpoint`` (any accepted file or Hugging Face
    directory) or from the Hub snapshot of ``manifest``, checked against the pretrained one,
    whose projection stands in for a missing one."""
    checkpoint = downloaded(checkpoint, manifest, f"import-finetuned {task}")
    reference = load_clip(zoo, pretrained).visual.state_dict()
    sd = load_state_dict(checkpoint, trust_pickles=zoo["trust_pickles"], pretrained_visual=reference)
    check_compatible(reference, sd, pretrained, f"{checkpoint} ({task})")
    save_state_dict(sd, out)


def head(zoo: dict, task: str, pretrained: str, out: str) -> None:
    """The zero-shot classification head of one task from its class names and templates."""
    model = load_clip(zoo, pretrained)
    tokenizer = load_tokenizer(zoo, Path(pretrained).parent)
    classnames, templates = task_prompts(zoo, task)
    save_head(zero_shot_weights(model, tokenizer, classnames, templates, device=default_device()), out)
