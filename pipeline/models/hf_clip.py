"""Hugging Face ``transformers`` CLIP vision checkpoints as open_clip image encoders.

``CLIPVisionModelWithProjection`` and ``CLIPModel`` weights map one to one onto open_clip's
``VisionTransformer``: q/k/v projections are stacked into ``in_proj_weight``/``in_proj_bias``
and ``visual_projection.weight`` is transposed into ``proj``. A plain ``CLIPVisionModel`` has
no projection into the joint image-text space, so zero-shot heads cannot use it: it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

HF_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"

# transformers.CLIPVisionConfig defaults: config.json files written by save_pretrained omit them.
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

_RENAMES = {
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
# Buffers of older transformers versions that carry no weights.
_IGNORED = {"vision_model.embeddings.position_ids"}


def _vision_config(hf_config: Any) -> dict[str, Any]:
    """The vision settings (HF defaults filled in) of a ``CLIPVisionConfig``/``CLIPConfig`` or
    of their config.json dict; ``projection_dim`` comes from the top level of a CLIPConfig."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if "vision_config" in cfg:
        vision = {**_HF_VISION_DEFAULTS, **(cfg["vision_config"] or {})}
        vision["projection_dim"] = cfg.get("projection_dim", _HF_VISION_DEFAULTS["projection_dim"])
        return vision
    return {**_HF_VISION_DEFAULTS, **cfg}


def open_clip_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """open_clip settings of the image tower of a HF CLIP config: ``embed_dim``,
    ``quick_gelu`` and ``vision_cfg``, i.e. the arguments of
    ``open_clip.model._build_vision_tower`` (and the matching keys of an open_clip model
    config)."""
    v = _vision_config(hf_config)
    if v["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"hidden_act {v['hidden_act']!r} of the HF CLIP config has no open_clip "
            "equivalent; supported: 'quick_gelu', 'gelu'"
        )
    width, heads = v["hidden_size"], v["num_attention_heads"]
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    return {
        "embed_dim": v["projection_dim"],
        "quick_gelu": v["hidden_act"] == "quick_gelu",
        "vision_cfg": {
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "width": width,
            "layers": v["num_hidden_layers"],
            "head_width": width // heads,
            "mlp_ratio": v["intermediate_size"] / width,
            "norm_kwargs": {"eps": v["layer_norm_eps"]},
        },
    }


def hf_vision_to_open_clip(
    hf_sd: Mapping[str, torch.Tensor], hf_config: Any | None = None
) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state dict of the vision tower and projection in a HF
    ``CLIPVisionModelWithProjection``/``CLIPModel`` state dict (other keys, such as the text
    tower's, are ignored). With ``hf_config`` the weights are checked against its layer count
    and widths."""
    if "visual_projection.weight" not in hf_sd:
        raise ValueError(
            "the Hugging Face checkpoint has no 'visual_projection.weight' (a CLIPVisionModel "
            "without projection); open_clip's image encoder needs the projection into the "
            "image-text space: use a CLIPVisionModelWithProjection or CLIPModel checkpoint"
        )
    vision = {k: v for k, v in hf_sd.items() if k.startswith("vision_model.") and k not in _IGNORED}

    def take(key: str) -> torch.Tensor:
        try:
            return vision.pop(key)
        except KeyError:
            raise ValueError(f"the Hugging Face CLIP vision checkpoint lacks {key!r}") from None

    out = {new: take(old) for old, new in _RENAMES.items()}
    layers = sorted({int(k.split(".")[3]) for k in vision if k.startswith("vision_model.encoder.layers.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"the Hugging Face CLIP checkpoint has non-contiguous layers {layers}")
    for i in layers:
        src, dst = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [take(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
        for old, new in _LAYER_RENAMES.items():
            out[dst + new] = take(src + old)
    if vision:
        raise ValueError(
            f"the Hugging Face CLIP checkpoint has vision keys with no open_clip counterpart "
            f"(an unsupported variant): {sorted(vision)[:5]}"
        )
    out["proj"] = hf_sd["visual_projection.weight"].t().contiguous()
    if hf_config is not None:
        _check_against_config(out, len(layers), open_clip_config_from_hf(hf_config))
    return out


def _check_against_config(sd: Mapping[str, torch.Tensor], layers: int, cfg: dict[str, Any]) -> None:
    vc = cfg["vision_cfg"]
    grid = vc["image_size"] // vc["patch_size"]
    expected = {
        "layers": (layers, vc["layers"]),
        "hidden_size": (sd["class_embedding"].shape[0], vc["width"]),
        "projection_dim": (sd["proj"].shape[1], cfg["embed_dim"]),
        "patch_size": (sd["conv1.weight"].shape[-1], vc["patch_size"]),
        "positions": (sd["positional_embedding"].shape[0], grid * grid + 1),
        "intermediate_size": (
            sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 0,
            round(vc["mlp_ratio"] * vc["width"]) if layers else 0,
        ),
    }
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(
            "the Hugging Face CLIP weights do not match their config.json: "
            + ", ".join(f"{k} is {w} in the weights but {c} in the config" for k, (w, c) in wrong.items())
        )
