"""Hugging Face ``transformers`` CLIP checkpoints as open_clip models.

HF towers map one to one onto open_clip's: q/k/v projections are stacked into
``in_proj_weight``/``in_proj_bias``, ``visual_projection.weight`` and
``text_projection.weight`` are transposed into ``proj`` and ``text_projection``. Vision
weights come in two key layouts:

- ``vision_model.*`` next to ``visual_projection.weight``: ``CLIPVisionModelWithProjection``
  and ``CLIPModel`` (transformers 4 and 5), and ``CLIPVisionModel`` of transformers 4;
- the tower's own keys (``embeddings.*``, ``encoder.layers.*``, ...), without prefix:
  ``CLIPVisionModel`` of transformers 5.

A ``CLIPVisionModel`` has no projection into the image-text space. FusionBench publishes its
fine-tuned encoders so, trained with the projection frozen: the pretrained CLIP's ``proj``
stands in for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

HF_PATCH_KEY = "embeddings.patch_embedding.weight"  # of a vision tower, behind its prefix
HF_VISION_PREFIX = "vision_model."

# transformers' CLIPVisionConfig and CLIPTextConfig defaults: config.json files written by
# older save_pretrained versions omit them.
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
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# Keys of each tower, relative to it (``vision_model.``/``text_model.`` removed).
_VISION_RENAMES = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_TEXT_RENAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
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
_IGNORED = {"embeddings.position_ids"}


def _as_dict(hf_config: Any) -> dict[str, Any]:
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def _vision_config(hf_config: Any) -> dict[str, Any]:
    """The vision settings (HF defaults filled in) of a ``CLIPVisionConfig``/``CLIPConfig`` or
    of their config.json dict; ``projection_dim`` comes from the top level of a CLIPConfig."""
    cfg = _as_dict(hf_config)
    if "vision_config" in cfg:
        vision = {**_HF_VISION_DEFAULTS, **(cfg["vision_config"] or {})}
        vision["projection_dim"] = cfg.get("projection_dim", _HF_VISION_DEFAULTS["projection_dim"])
        return vision
    return {**_HF_VISION_DEFAULTS, **cfg}


def _quick_gelu(hidden_act: str) -> bool:
    if hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"hidden_act {hidden_act!r} of the HF CLIP config has no open_clip "
            "equivalent; supported: 'quick_gelu', 'gelu'"
        )
    return hidden_act == "quick_gelu"


def _heads(width: int, heads: int) -> int:
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    return heads


def _mlp_ratio(intermediate: int, width: int) -> float:
    """The ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` is ``intermediate``
    (``intermediate / width`` itself can fall a rounding error short)."""
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def open_clip_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """open_clip settings of the image tower of a HF CLIP config: ``embed_dim``,
    ``quick_gelu`` and ``vision_cfg``, i.e. the arguments of
    ``open_clip.model._build_vision_tower`` (and the matching keys of an open_clip model
    config)."""
    v = _vision_config(hf_config)
    width = v["hidden_size"]
    return {
        "embed_dim": v["projection_dim"],
        "quick_gelu": _quick_gelu(v["hidden_act"]),
        "vision_cfg": {
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "width": width,
            "layers": v["num_hidden_layers"],
            "head_width": width // _heads(width, v["num_attention_heads"]),
            "mlp_ratio": _mlp_ratio(v["intermediate_size"], width),
            "norm_kwargs": {"eps": v["layer_norm_eps"]},
        },
    }


def clip_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``,
    ``text_cfg``) of a HF ``CLIPConfig`` or its config.json dict."""
    cfg = _as_dict(hf_config)
    if "text_config" not in cfg:
        raise ValueError(
            f"the Hugging Face config (model_type {cfg.get('model_type')!r}) is not a CLIPModel "
            "config: it has no text_config, and a pretrained CLIP needs its text tower"
        )
    out = open_clip_config_from_hf(cfg)
    t = {**_HF_TEXT_DEFAULTS, **(cfg["text_config"] or {})}
    if _quick_gelu(t["hidden_act"]) != out["quick_gelu"]:
        raise ValueError(
            f"the HF CLIP text tower uses hidden_act {t['hidden_act']!r} but the vision tower "
            f"{_vision_config(cfg)['hidden_act']!r}; open_clip uses one activation for both"
        )
    eos, vocab = t["eos_token_id"], t["vocab_size"]
    if eos not in (2, vocab - 1):
        raise ValueError(
            f"the HF CLIP text config has eos_token_id {eos!r}: transformers pools text features "
            "at the first end token, open_clip at the highest token id, which agree only for "
            f"eos_token_id 2 (the legacy value, pooled at the highest id too) or vocab_size - 1 "
            f"({vocab - 1})"
        )
    width = t["hidden_size"]
    out["text_cfg"] = {
        "context_length": t["max_position_embeddings"],
        "vocab_size": vocab,
        "width": width,
        "heads": _heads(width, t["num_attention_heads"]),
        "layers": t["num_hidden_layers"],
        "mlp_ratio": _mlp_ratio(t["intermediate_size"], width),
        "norm_kwargs": {"eps": t["layer_norm_eps"]},
    }
    return out


def _map_tower(tower: Mapping[str, torch.Tensor], renames: Mapping[str, str], name: str) -> tuple[dict, int]:
    """open_clip keys and layer count of one HF tower (keys relative to it): ``renames`` outside
    the encoder layers; refuses missing keys and keys left over."""
    left = {k: v for k, v in tower.items() if k not in _IGNORED}

    def take(key: str) -> torch.Tensor:
        try:
            return left.pop(key)
        except KeyError:
            raise ValueError(f"the Hugging Face CLIP {name} tower lacks {key!r}") from None

    out = {new: take(old) for old, new in renames.items()}
    layers = sorted({int(k.split(".")[2]) for k in left if k.startswith("encoder.layers.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"the Hugging Face CLIP {name} tower has non-contiguous layers {layers}")
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [take(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
        for old, new in _LAYER_RENAMES.items():
            out[dst + new] = take(src + old)
    if left:
        raise ValueError(
            f"the Hugging Face CLIP {name} tower has keys with no open_clip counterpart "
            f"(an unsupported variant): {sorted(left)[:5]}"
        )
    return out, len(layers)


def hf_vision_to_open_clip(
    hf_sd: Mapping[str, torch.Tensor],
    hf_config: Any | None = None,
    *,
    projection: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state dict of the vision tower and projection in a HF
    CLIP state dict of either layout (see the module docstring; other keys, such as the text
    tower's, are ignored). ``projection`` (an open_clip ``proj``, the pretrained CLIP's) is used
    when the checkpoint has no ``visual_projection.weight``. With ``hf_config`` the weights
    are checked against its layer count and widths."""
    if "visual_projection.weight" in hf_sd:
        proj = hf_sd["visual_projection.weight"].t().contiguous()
    elif projection is not None:
        proj = projection.detach().clone()
    else:
        raise ValueError(
            "the Hugging Face checkpoint has no 'visual_projection.weight' (a CLIPVisionModel, "
            "as FusionBench publishes its encoders, fine-tuned with the projection frozen); "
            "pass the pretrained CLIP's image encoder to take its projection "
            "(load_state_dict(..., pretrained_visual=...))"
        )
    prefixed = {k[len(HF_VISION_PREFIX) :]: v for k, v in hf_sd.items() if k.startswith(HF_VISION_PREFIX)}
    tower = prefixed or {k: v for k, v in hf_sd.items() if k != "visual_projection.weight"}
    out, layers = _map_tower(tower, _VISION_RENAMES, "vision")
    out["proj"] = proj
    if hf_config is not None:
        _check_against_config(
            out, layers, open_clip_config_from_hf(hf_config), "visual_projection.weight" in hf_sd
        )
    return out


def hf_clip_to_open_clip(hf_sd: Mapping[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """Full open_clip ``CLIP`` state dict (both towers, projections, ``logit_scale``) of a HF
    ``CLIPModel`` state dict (``vision_model.*``, ``text_model.*``, ...) and its config."""
    visual = hf_vision_to_open_clip(hf_sd, hf_config)
    text = {k[len("text_model.") :]: v for k, v in hf_sd.items() if k.startswith("text_model.")}
    if not text:
        raise ValueError(
            "the Hugging Face checkpoint has no text tower ('text_model.*' keys); a pretrained "
            "CLIP must be a full CLIPModel"
        )
    out, _ = _map_tower(text, _TEXT_RENAMES, "text")
    for key in ("text_projection.weight", "logit_scale"):
        if key not in hf_sd:
            raise ValueError(f"the Hugging Face CLIPModel checkpoint lacks {key!r}")
    out["text_projection"] = hf_sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = hf_sd["logit_scale"]
    return {**{f"visual.{k}": v for k, v in visual.items()}, **out}


def _check_against_config(
    sd: Mapping[str, torch.Tensor], layers: int, cfg: dict[str, Any], own_projection: bool
) -> None:
    """Refuse weights whose shapes disagree with their config (the projection only when it is
    the checkpoint's own: a stand-in comes from another model)."""
    vc = cfg["vision_cfg"]
    grid = vc["image_size"] // vc["patch_size"]
    expected = {
        "layers": (layers, vc["layers"]),
        "hidden_size": (sd["class_embedding"].shape[0], vc["width"]),
        "patch_size": (sd["conv1.weight"].shape[-1], vc["patch_size"]),
        "positions": (sd["positional_embedding"].shape[0], grid * grid + 1),
        "intermediate_size": (
            sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 0,
            int(vc["mlp_ratio"] * vc["width"]) if layers else 0,
        ),
    }
    if own_projection:
        expected["projection_dim"] = (sd["proj"].shape[1], cfg["embed_dim"])
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(
            "the Hugging Face CLIP weights do not match their config.json: "
            + ", ".join(f"{k} is {w} in the weights but {c} in the config" for k, (w, c) in wrong.items())
        )
