"""Pretrained open_clip CLIP models (ViT-B-32, ViT-B-16, ViT-L-14, any open_clip or project
architecture) from an open_clip pretrained tag or a local checkpoint file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip

from pipeline.models.checkpoints import check_finite
from pipeline.models.clip import register_configs

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def load_pretrained_clip(
    arch: str, pretrained: str, cache_dir: str | Path | None = None
) -> tuple[open_clip.model.CLIP, Callable, Callable]:
    """``(model, preprocess_val, tokenizer)`` of open_clip architecture ``arch`` with weights
    from ``pretrained``: an existing file holding the full CLIP state dict (``.pt`` read with
    ``weights_only=True``, or ``.safetensors``), or else an open_clip tag such as ``openai``
    or ``laion2b_s34b_b79k`` (downloaded into ``cache_dir`` when online).

    A tag trained with QuickGELU (``openai``) gets QuickGELU; a local file of such weights
    needs the ``-quickgelu`` architecture (e.g. ``ViT-B-32-quickgelu``), as in open_clip.
    """
    register_configs()
    cache = None if cache_dir is None else str(cache_dir)
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; known ones include ViT-B-32, ViT-B-16, "
            "ViT-L-14 (see open_clip.list_models())"
        )
    path = Path(pretrained).expanduser()
    quick_gelu = False
    if path.is_file():
        source = str(path)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not tag_cfg:
            if path.suffix in _CHECKPOINT_SUFFIXES or len(path.parts) > 1:
                raise FileNotFoundError(
                    f"pretrained weights file {path} for {arch} does not exist; put the full "
                    "CLIP checkpoint there or give an open_clip tag"
                )
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(
                f"{pretrained!r} is neither an open_clip pretrained tag of {arch} (its tags: "
                f"{tags or 'none'}) nor an existing file; set `pretrained` to a known tag or to "
                "the path of a local checkpoint file of the full CLIP (.pt or .safetensors)"
            )
        try:
            open_clip.download_pretrained(tag_cfg, cache_dir=cache)
        except Exception as err:  # network failures surface as many exception types
            raise RuntimeError(
                f"could not download open_clip weights {arch} / {pretrained!r} ({err}); when "
                "offline, fetch them on a machine with network and set `pretrained` to the "
                "local checkpoint file path"
            ) from err
        source, quick_gelu = pretrained, bool(tag_cfg.get("quick_gelu", False))
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        arch,
        pretrained=source,
        cache_dir=cache,
        force_quick_gelu=quick_gelu,
    )
    check_finite(model.state_dict(), f"{arch} weights {pretrained}")
    return model.eval(), preprocess_val, open_clip.get_tokenizer(arch)
