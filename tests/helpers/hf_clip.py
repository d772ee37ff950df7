"""Tiny random ``transformers`` CLIP models, the formats Hugging Face and FusionBench publish in
miniature: save them with transformers' own ``save_pretrained``."""

from __future__ import annotations

import torch
import transformers
from safetensors.torch import load_file, save_file

VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    projection_dim=32,
)
# open_clip's tokenizer vocabulary, context length and end token, so that its SimpleTokenizer
# and argmax pooling apply
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=49408,
    max_position_embeddings=77,
    eos_token_id=49407,
)


def vision_model(seed: int = 0, projection: bool = True, hidden_act: str = "quick_gelu", **overrides):
    """A ``CLIPVisionModelWithProjection`` (or, without projection, a ``CLIPVisionModel``)."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**VISION, **overrides}, hidden_act=hidden_act)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    return cls(config).eval()


def clip_model(seed: int = 0, hidden_act: str = "quick_gelu") -> transformers.CLIPModel:
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        vision_config={**VISION, "hidden_act": hidden_act},
        text_config={**TEXT, "hidden_act": hidden_act},
        projection_dim=VISION["projection_dim"],
    )
    return transformers.CLIPModel(config).eval()


def pooled(output) -> torch.Tensor:
    """The features of a ``get_image_features``/``get_text_features`` call: a tensor in
    transformers 4, an output object whose ``pooler_output`` they are in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def rename_keys(path, fn) -> None:
    """Rewrite the safetensors file ``path`` with every key passed through ``fn``."""
    save_file({fn(k): v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
