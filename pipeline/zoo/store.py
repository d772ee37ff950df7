"""On-disk layout of a zoo (the same for synthetic and real ones) and its loaders.

    resources/models/{zoo}/pretrained.safetensors      full CLIP state dict
    resources/models/{zoo}/model_config.json           its open_clip model config (real zoos)
    resources/models/{zoo}/tokenizer.json              word vocabulary (synthetic zoos only)
    resources/models/{zoo}/heads/{task}.safetensors    {"weight": (classes, dim)} zero-shot head
    resources/models/{zoo}/finetuned/{task}.safetensors image-encoder state dict
    resources/data/{zoo}/{task}.npz                    synthetic task splits (uint8 images)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.io import write_json
from pipeline.models.checkpoints import check_finite, load_safetensors, save_state_dict
from pipeline.models.clip import WordTokenizer, create_model
from pipeline.models.pretrained import register_model_config

if TYPE_CHECKING:
    import open_clip


MODEL_CONFIG = "model_config.json"


def save_model_config(arch: str, pretrained_path: str | Path) -> None:
    """Write open_clip's model config of ``arch`` beside the pretrained weights, so that
    :func:`load_clip` rebuilds the architecture in jobs where open_clip does not know it."""
    import open_clip

    write_json(open_clip.get_model_config(arch), Path(pretrained_path).parent / MODEL_CONFIG)


def register_saved_config(arch: str, config: str | Path) -> None:
    """Register architecture ``arch`` from a model config written by :func:`save_model_config`."""
    register_model_config(arch, json.loads(Path(config).read_text()), str(config))


def load_clip(zoo: dict, path: str | Path) -> open_clip.model.CLIP:
    """The zoo's pretrained CLIP from its saved full state dict, its architecture registered
    from the model config beside it when there is one."""
    config = Path(path).parent / MODEL_CONFIG
    if config.exists():
        register_saved_config(zoo["arch"], config)
    model = create_model(zoo["arch"])
    model.load_state_dict(load_safetensors(path))
    return model.eval()


def load_tokenizer(zoo: dict, models_dir: str | Path):
    """The word tokenizer of a synthetic zoo, or open_clip's tokenizer of a real arch."""
    if zoo["source"] == "synthetic":
        vocab = json.loads((Path(models_dir) / "tokenizer.json").read_text())
        return WordTokenizer(vocab["words"], vocab["context_length"])
    import open_clip

    return open_clip.get_tokenizer(zoo["arch"])


def load_head(path: str | Path) -> torch.Tensor:
    return load_safetensors(path)["weight"]


def save_head(weight: torch.Tensor, path: str | Path) -> None:
    save_state_dict({"weight": weight}, path)


def load_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An image-encoder state dict written by the pipeline (fine-tuned, imported or merged),
    refused when unreadable or holding NaN or Inf."""
    state = load_safetensors(path)
    check_finite(state, f"encoder {path}")
    return state
