"""Pretrained open_clip CLIP models (ViT-B-32, ViT-B-16, ViT-L-14, any open_clip or project
architecture) from an open_clip pretrained tag, a local checkpoint file or a Hugging Face
``CLIPModel`` directory, and the registration of architectures open_clip does not ship."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.models.checkpoints import check_finite, read_hf_dir, read_state_dict_file
from pipeline.models.clip import create_model, register_configs
from pipeline.models.hf_clip import clip_config_from_hf, hf_clip_to_open_clip

if TYPE_CHECKING:  # open_clip is imported where a model is built: it costs every job 2-3 s
    import open_clip

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def load_pretrained_clip(
    arch: str, pretrained: str, cache_dir: str | Path | None = None
) -> tuple[open_clip.model.CLIP, Callable, Callable]:
    """``(model, preprocess_val, tokenizer)`` of open_clip architecture ``arch`` with weights
    from ``pretrained``: a Hugging Face ``CLIPModel`` ``save_pretrained`` directory (such as an
    ``openai/clip-vit-base-patch32`` snapshot), an existing file holding the full open_clip
    CLIP state dict (safetensors or ``torch.save`` read with ``weights_only=True``, told apart
    by content), or else an open_clip tag such as ``openai`` or ``laion2b_s34b_b79k``
    (downloaded into ``cache_dir`` when online).

    The architecture of a Hugging Face directory comes from its config.json: a known ``arch``
    must agree with it, an unknown one is registered with it. Weights trained with QuickGELU
    (OpenAI's) need the ``-quickgelu`` architecture (e.g. ``ViT-B-32-quickgelu``), so that
    every later job rebuilds the model with the activation it was trained with.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    register_configs()
    path = Path(pretrained).expanduser()
    if path.is_dir():
        model = _from_hf_dir(arch, path)
    elif arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; known ones include ViT-B-32, ViT-B-16, "
            "ViT-L-14 (see open_clip.list_models()); a new architecture needs a Hugging Face "
            "CLIPModel directory as `pretrained`, whose config.json defines it"
        )
    elif path.is_file():
        model = create_model(arch)
        _load_full(model, read_state_dict_file(path), path, arch)
    else:
        model = _from_tag(arch, pretrained, cache_dir)
    check_finite(model.state_dict(), f"{arch} weights {pretrained}")
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def register_model_config(name: str, cfg: Mapping[str, Any], source: str) -> None:
    """Make open_clip build architecture ``name`` from the model config ``cfg`` (read from
    ``source``, which errors name); an architecture open_clip already knows must have this
    very config."""
    import open_clip

    register_configs()
    cfg = json.loads(json.dumps(cfg))  # as open_clip reads it back: lists, not tuples
    known = open_clip.get_model_config(name)
    if known is not None:
        if known != cfg:
            raise ValueError(
                f"{source} describes architecture {name!r} differently from the open_clip "
                f"config of that name ({known}); name the architecture differently, or import "
                "the pretrained model again with this open_clip version"
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"{name}.json"
        file.write_text(json.dumps(cfg))
        open_clip.add_model_config(file)  # read at once: the registry keeps it once the file is gone


def _from_tag(arch: str, tag: str, cache_dir: str | Path | None) -> open_clip.model.CLIP:
    import open_clip

    path = Path(tag)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        if path.suffix in _CHECKPOINT_SUFFIXES or len(path.parts) > 1:
            raise FileNotFoundError(
                f"pretrained weights file {path} for {arch} does not exist; put the full "
                "CLIP checkpoint (or a Hugging Face CLIPModel directory) there or give an "
                "open_clip tag"
            )
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(
            f"{tag!r} is neither an open_clip pretrained tag of {arch} (its tags: "
            f"{tags or 'none'}) nor an existing file or directory; set `pretrained` to a known "
            "tag, to the path of a local checkpoint file of the full CLIP (.pt or "
            ".safetensors) or to a Hugging Face CLIPModel directory"
        )
    quick_gelu = bool(open_clip.get_model_config(arch).get("quick_gelu", False))
    if bool(tag_cfg.get("quick_gelu", False)) != quick_gelu:
        raise ValueError(
            f"the open_clip weights {arch} / {tag!r} were trained with"
            f"{'' if tag_cfg.get('quick_gelu') else 'out'} QuickGELU but {arch} builds "
            f"{'QuickGELU' if quick_gelu else 'GELU'}; set the architecture to "
            f"{_quick_gelu_twin(arch)}"
        )
    cache = None if cache_dir is None else str(cache_dir)
    try:
        open_clip.download_pretrained(tag_cfg, cache_dir=cache)
    except Exception as err:  # network failures surface as many exception types
        raise RuntimeError(
            f"could not download open_clip weights {arch} / {tag!r} ({err}); when "
            "offline, fetch them on a machine with network and set `pretrained` to the "
            "local checkpoint file path"
        ) from err
    return open_clip.create_model(arch, pretrained=tag, cache_dir=cache)


def _quick_gelu_twin(arch: str) -> str:
    """``ViT-B-32-quickgelu`` for ``ViT-B-32`` and back."""
    return arch.removesuffix("-quickgelu") if arch.endswith("-quickgelu") else f"{arch}-quickgelu"


def _from_hf_dir(arch: str, path: Path) -> open_clip.model.CLIP:
    """The open_clip CLIP of a Hugging Face ``CLIPModel`` directory, ``arch`` checked against
    (or registered with) the config derived from its config.json."""
    import open_clip

    hf_sd, hf_config = read_hf_dir(path)
    if hf_config is None:
        raise FileNotFoundError(
            f"{path} has no config.json; a Hugging Face CLIPModel directory needs the "
            "config.json that save_pretrained writes next to the weights"
        )
    try:
        derived = clip_config_from_hf(hf_config)
        sd = hf_clip_to_open_clip(hf_sd, hf_config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if arch in open_clip.list_models():
        wrong = _differences(open_clip.get_model_config(arch), derived, arch)
        if wrong:
            twin = _quick_gelu_twin(arch)
            only_activation = len(wrong) == 1 and wrong[0].startswith("quick_gelu")
            hint = (
                f"Set the architecture to {twin}"
                if only_activation and twin in open_clip.list_models()
                else "Set the architecture the weights were trained as"
            )
            raise ValueError(
                f"{path} does not match open_clip architecture {arch}: {'; '.join(wrong)}. "
                f"{hint}, or name one open_clip does not know to build the model from "
                f"{path / 'config.json'}"
            )
    else:
        register_model_config(arch, derived, str(path / "config.json"))
    model = create_model(arch)
    _load_full(model, sd, path, arch)
    return model


def _differences(arch_cfg: Mapping[str, Any], derived: Mapping[str, Any], arch: str) -> list[str]:
    """Settings in which the open_clip model config of ``arch`` and the one derived from a
    checkpoint build different models (open_clip's defaults filled in on both sides)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    def top(cfg: Mapping[str, Any]) -> dict[str, Any]:  # unset and off are the same
        out = {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg") and v}
        return {**out, "quick_gelu": bool(cfg.get("quick_gelu"))}

    def tower(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
        full = dataclasses.asdict(cls(**cfg))
        full["mlp_width"] = int(full.pop("mlp_ratio") * full["width"])  # as open_clip builds it
        full["norm_kwargs"] = {"eps": 1e-5, **(full["norm_kwargs"] or {})}  # LayerNorm's default
        return full

    ours, theirs = top(arch_cfg), top(derived)
    out = [
        f"{k} is {ours.get(k)!r} in {arch} but {theirs.get(k)!r} in the checkpoint"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    ]
    for key, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        ours, theirs = tower(cls, arch_cfg[key]), tower(cls, derived[key])
        out += [
            f"{key}.{k} is {ours[k]!r} in {arch} but {theirs[k]!r} in the checkpoint"
            for k in ours
            if ours[k] != theirs[k]
        ]
    return out


def _load_full(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load a full CLIP state dict (``module.`` of a DDP training checkpoint stripped)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as err:
        hf = any(k.startswith(("vision_model.", "text_model.")) for k in sd)
        hint = (
            "it holds Hugging Face CLIP keys: give its save_pretrained directory (with "
            "config.json) instead"
            if hf
            else "it must hold the full CLIP (both towers) of that architecture"
        )
        raise ValueError(f"{path} is not an open_clip {arch} state dict ({hint}): {err}") from None
