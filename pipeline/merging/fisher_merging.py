"""Fisher merging (Matena & Raffel, 2022): per-parameter weighted mean of the fine-tuned
weights, weighted by each model's diagonal Fisher information.

F_k = mean over N training examples of (d log p(y | x) / d theta)^2 with y sampled from the
model's own prediction (the true Fisher, not the empirical one), through the task's frozen
zero-shot head. theta = sum_k c_k (F_k + eps) theta_k / sum_k c_k (F_k + eps), with
c_k = 1 / ||F_k|| when ``normalize`` (FusionBench's default; eps = 1e-6 as there and in the
paper's code). Tensors that are not parameters (buffers) are averaged. Only one fine-tuned
model and its Fisher are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.merging.contract import Inputs, MergedState, StateDict
from pipeline.models.clip import logits

DEFAULT_EXAMPLES = 256
DEFAULT_MIN_FISHER = 1e-6


def diagonal_fisher(encoder: nn.Module, head: torch.Tensor, dataset: Dataset, examples: int = DEFAULT_EXAMPLES,
                    seed: int = 0, desc: str = "fisher") -> StateDict:
    """Diagonal Fisher of ``encoder`` + ``head`` on the first ``examples`` of ``dataset``
    (in a seeded random order), labels sampled from the model's predictions."""
    params = dict(encoder.named_parameters())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:examples]
    encoder.eval()
    for i in tqdm(order.tolist(), desc=desc, mininterval=2):
        x = dataset[i][0].unsqueeze(0)
        log_p = F.log_softmax(logits(encoder(x), head), dim=-1)[0]
        if not bool(torch.isfinite(log_p).all()):
            raise FloatingPointError(f"{desc}: the predictions on training example {i} are NaN or Inf: the fine-tuned "
                                     "encoder, its head or the example holds NaN or Inf")
        y = torch.multinomial(log_p.detach().exp(), 1, generator=gen)[0]
        grads = torch.autograd.grad(log_p[y], list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                fisher[name] += g.float() ** 2
    return {name: f / len(order) for name, f in fisher.items()}


def fisher_average(models: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                   min_fisher: float = DEFAULT_MIN_FISHER, normalize: bool = True) -> StateDict:
    """Fisher-weighted mean of ``(state dict, fisher)`` pairs, streamed one model at a time.

    Floating tensors without a Fisher are averaged, others are taken from the first model."""
    num, den, count, first = {}, {}, 0, None
    for state, fisher in models:
        first = first or state
        count += 1
        scale = 1.0 / (torch.sqrt(sum((f.float() ** 2).sum() for f in fisher.values())) + min_fisher) if normalize else 1.0
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            weight = scale * (fisher[key].float() + min_fisher) if key in fisher else torch.ones_like(value, dtype=torch.float32)
            num[key] = num.get(key, 0) + weight * value.float()
            den[key] = den.get(key, 0) + weight
    if not count:
        raise ValueError("Fisher merging needs at least one model")
    return {key: (num[key] / den[key]).to(v.dtype) if key in num else v for key, v in first.items()}


@dataclass(frozen=True)
class Settings:
    """``examples``: training examples per task of the Fisher estimate (256: this
    project's choice, as RegMean's); ``min_fisher``: 1e-6, added to every entry (the paper's code
    and FusionBench); ``normalize``: each Fisher scaled to unit norm (FusionBench's default)."""

    examples: int = DEFAULT_EXAMPLES
    min_fisher: float = DEFAULT_MIN_FISHER
    normalize: bool = True


def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
    """Fisher-merge the fine-tuned encoders (``inputs.finetuned``, visited one at a time)
    through their heads on their training splits; ``inputs.encoder`` is a module of the
    architecture, its weights are overwritten."""
    encoder = inputs.encoder

    def models():
        for name, state, head, data in zip(inputs.tasks, inputs.finetuned, inputs.heads, inputs.train, strict=True):
            encoder.load_state_dict(state)
            yield state, diagonal_fisher(encoder, head, data, settings.examples, inputs.seed, desc=f"fisher {name}")

    return MergedState(fisher_average(models(), settings.min_fisher, settings.normalize))
