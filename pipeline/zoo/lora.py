"""LoRA (Hu et al., 2022) task updates of the image encoder, the parameter-efficient modules
(PEM) of the paper's composition experiment: every weight matrix of the transformer blocks
(attention in/out projections, MLP) gets W + (alpha / r) B A with A (r x in), B (out x r);
only A and B train (B starts at zero, so training starts from the pretrained model).

A task's LoRA update as a task vector is the dense (alpha / r) B A of each adapted matrix and
zero elsewhere, so it composes like full fine-tuning task vectors (addition, negation,
AdaMerging) through the same store and merging code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGETS = re.compile(r"resblocks\.\d+\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")


class LowRankUpdate(nn.Module):
    """Parametrization W -> W + scale * B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def target_names(encoder: nn.Module) -> list[str]:
    """Names of the encoder's parameters that get adapters."""
    return [name for name, p in encoder.named_parameters() if p.dim() == 2 and TARGETS.search(name)]


def add_adapters(encoder: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LowRankUpdate]:
    """Freeze ``encoder`` and attach a trainable LoRA adapter to each target matrix."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    names = target_names(encoder)
    if not names:
        raise ValueError("the encoder has no transformer weight matrix to adapt (resblocks.*.attn/mlp)")
    encoder.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name in names:
        module_name, _, param = name.rpartition(".")
        module = encoder.get_submodule(module_name)
        out_features, in_features = getattr(module, param).shape
        adapters[name] = LowRankUpdate(out_features, in_features, rank, alpha, generator)
        parametrize.register_parametrization(module, param, adapters[name])
    return adapters


def factors(adapters: Mapping[str, LowRankUpdate]) -> dict[str, torch.Tensor]:
    """The adapters' trained factors as a flat state dict: ``{name}.lora_A``, ``{name}.lora_B``
    and the scale ``{name}.lora_scale`` (a 0-d tensor)."""
    out = {}
    for name, a in adapters.items():
        out |= {f"{name}.lora_A": a.A.detach().clone(), f"{name}.lora_B": a.B.detach().clone(),
                f"{name}.lora_scale": torch.tensor(a.scale)}
    return out


def deltas(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense updates scale * B @ A per adapted weight, from a factors state dict."""
    names = [k.removesuffix(".lora_A") for k in lora if k.endswith(".lora_A")]
    return {n: lora[f"{n}.lora_scale"] * (lora[f"{n}.lora_B"] @ lora[f"{n}.lora_A"]) for n in names}


def as_task_vector(pretrained: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA update as a full fine-tuned-minus-pretrained state dict (zeros where no adapter)."""
    dense = deltas(lora)
    unknown = sorted(set(dense) - set(pretrained))
    if unknown:
        raise KeyError(f"LoRA factors for tensors the encoder does not have: {unknown[:3]}")
    return {k: dense[k].to(v.dtype) if k in dense else torch.zeros_like(v)
            for k, v in pretrained.items() if v.is_floating_point()}
