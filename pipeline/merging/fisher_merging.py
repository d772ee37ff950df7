"""Fisher merging (Matena & Raffel, 2022): per-parameter weighted mean of the fine-tuned
weights, weighted by each model's diagonal Fisher information through the task's frozen
zero-shot head, on N training examples per task:

- ``exact`` (the default; the paper's code, mmatena/model_merging model_merging/fisher.py,
  takes this expectation): F = 1/N sum_x sum_c p(c|x) (d log p(c|x) / d theta)^2, the
  expectation over the classes under the model's own predictive distribution;
- ``sampled``: one label per example drawn from p(.|x), F = 1/N sum_x (d log p(y|x) / d theta)^2,
  an unbiased one-sample estimate of the same (a noisy one under confident predictions: the
  rare classes, whose gradients are large, are seldom drawn);
- ``fusionbench``: FusionBench's ``FisherMergingForCLIPVisionModel.get_fisher_weights``: per
  batch B the gradient of sum_{x in B} sum_c sqrt(p(c|x)) log p(c|x) (p held constant),
  squared, summed over batches, / N. Squaring the batch sum keeps the cross terms between
  examples and between classes, so it is not the Fisher even with batches of one.

The exact estimator takes per-example gradients with torch.func: one forward per example (and
chunk of classes) and the pullback of log p along sqrt(p_c) e_c for the chunk's classes at
once (vmap over the classes of one vjp, and over the examples of a batch), so each squared
gradient is one example's. One backward per class over a batch would sum the examples'
gradients before squaring (FusionBench's cross terms). Per example it costs C pullbacks, about
C times the sampled estimator. The (example, class) gradients in flight, each counted twice
for the pullback's intermediates, take ``inputs.budget_mib`` (4 bytes a parameter; at least
one gradient at a time).

theta = sum_k c_k (F_k + eps) theta_k / sum_k c_k (F_k + eps), with c_k = 1 / ||F_k|| when
``normalize`` (FusionBench's default; eps = 1e-6 as there and in the paper's code, which floors
instead of adding). Tensors that are not parameters (buffers) are averaged. open_clip's
``proj`` is a parameter of the image encoder, so its Fisher enters ||F_k|| (FusionBench's
CLIPVisionModel has no projection). Only one fine-tuned model and its Fisher are in memory at
a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.merging.contract import Inputs, MergedState, StateDict
from pipeline.models.clip import logits

DEFAULT_EXAMPLES = 256
DEFAULT_MIN_FISHER = 1e-6
ESTIMATORS = {  # name: what it computes, in a phrase (the report's note)
    "exact": "the exact diagonal Fisher (per example the expectation over the classes under the model's predictions)",
    "sampled": "a one-sample diagonal Fisher (one label per example drawn from the model's predictions)",
    "fusionbench": "FusionBench's estimate (the squared batch gradient of sum_c sqrt(p_c) log p_c)",
}


def _log_probs(encoder: nn.Module, head: torch.Tensor, x: torch.Tensor, index: Sequence[int],
               desc: str) -> torch.Tensor:
    """log p(.|x) of the batch ``x`` (examples ``index`` of the training split); predictions
    that are NaN or Inf are refused naming the first such example."""
    log_p = F.log_softmax(logits(encoder(x), head), dim=-1)
    bad = ~torch.isfinite(log_p).all(dim=-1)
    if bool(bad.any()):
        raise FloatingPointError(f"{desc}: the predictions on training example {index[int(bad.nonzero()[0])]} are NaN "
                                 "or Inf: the fine-tuned encoder, its head or the example holds NaN or Inf")
    return log_p


def _batch(dataset: Dataset, index: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in index]).to(device)


def _sampled(encoder, head, dataset, order, params, fisher, gen, desc) -> None:
    device = head.device
    for i in tqdm(order, desc=desc, mininterval=2):
        log_p = _log_probs(encoder, head, _batch(dataset, [i], device), [i], desc)[0]
        y = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=gen)[0]
        grads = torch.autograd.grad(log_p[y], list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                fisher[name] += g.float() ** 2


def _fusionbench(encoder, head, dataset, order, params, fisher, batch_size, desc) -> None:
    for start in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=2):
        index = order[start:start + batch_size]
        log_p = _log_probs(encoder, head, _batch(dataset, index, head.device), index, desc)
        total = (log_p.detach().exp().sqrt() * log_p).sum()
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                fisher[name] += g.float() ** 2


def _exact(encoder, head, dataset, order, params, fisher, budget_mib, desc) -> None:
    weights = {name: p.detach() for name, p in params.items()}
    classes = head.shape[0]
    gradient_bytes = sum(p.numel() * 4 for p in weights.values())
    pairs = max(1, int(budget_mib * 2**20 // (2 * gradient_bytes)))  # (example, class) gradients in flight
    chunk = min(classes, pairs)
    per_call = max(1, pairs // chunk)

    def log_probs(w, x):
        return F.log_softmax(logits(functional_call(encoder, w, (x[None],)), head), dim=-1)[0]

    def squared_scores(w, x, directions):  # directions (m, C): rows sqrt(p_c) e_c
        _, pullback = vjp(lambda v: log_probs(v, x), w)
        (grads,) = vmap(pullback)(directions)
        return {name: g.float().square().sum(0) for name, g in grads.items()}

    per_example = vmap(squared_scores, in_dims=(None, 0, 0))
    for start in tqdm(range(0, len(order), per_call), desc=desc, mininterval=2):
        index = order[start:start + per_call]
        x = _batch(dataset, index, head.device)
        with torch.no_grad():
            root_p = _log_probs(encoder, head, x, index, desc).exp().sqrt()
        for cs in torch.arange(classes, device=head.device).split(chunk):
            directions = torch.zeros(len(index), len(cs), classes, dtype=root_p.dtype, device=head.device)
            directions[:, torch.arange(len(cs)), cs] = root_p[:, cs]
            with sdpa_kernel(SDPBackend.MATH):  # its backward vmaps; the fused CPU kernel's loops, warning
                scores = per_example(weights, x, directions)
            for name, f in scores.items():
                fisher[name] += f.sum(0)


def diagonal_fisher(encoder: nn.Module, head: torch.Tensor, dataset: Dataset, examples: int = DEFAULT_EXAMPLES,
                    seed: int = 0, estimator: str = "exact", batch_size: int = 32, budget_mib: float = 1024,
                    desc: str = "fisher") -> StateDict:
    """Diagonal Fisher (fp32, on the CPU) of ``encoder`` + ``head`` on ``examples`` examples of
    ``dataset`` in a seeded random order, by ``estimator`` (see the module);
    ``batch_size``: the fusionbench estimator's batches; ``budget_mib``: the memory of the exact
    one's gradients in flight. Runs where the encoder's parameters are."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"Fisher merging: unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    params = dict(encoder.named_parameters())
    head = head.to(next(iter(params.values())).device)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:examples].tolist()  # the sampled labels follow in gen
    encoder.eval()
    if estimator == "exact":
        _exact(encoder, head, dataset, order, params, fisher, budget_mib, desc)
    elif estimator == "sampled":
        _sampled(encoder, head, dataset, order, params, fisher, gen, desc)
    else:
        _fusionbench(encoder, head, dataset, order, params, fisher, batch_size, desc)
    return {name: (f / len(order)).cpu() for name, f in fisher.items()}


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
    """``examples``: 256 training examples per task (FusionBench's num_fisher_examples,
    fusion_bench_config/method/fisher_merging/clip_fisher_merging.yaml); ``min_fisher``: 1e-6,
    added to every entry (minimal_fisher_weight there; the paper's code floors at 1e-6);
    ``normalize``: each Fisher scaled to unit norm (normalize_fisher_weight: true there);
    ``estimator``: ``exact`` (the paper's code), ``sampled`` or ``fusionbench`` (see the
    module); ``batch_size``: 32, the batches of the fusionbench estimator, whose squared batch
    gradients depend on it (clip_fisher_merging.yaml dataloader_kwargs.batch_size)."""

    examples: int = DEFAULT_EXAMPLES
    min_fisher: float = DEFAULT_MIN_FISHER
    normalize: bool = True
    estimator: str = "exact"
    batch_size: int = 32

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"fisher_merging: unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")


def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
    """Fisher-merge the fine-tuned encoders (``inputs.finetuned``, visited one at a time)
    through their heads on their training splits, on ``inputs.device``; ``inputs.encoder`` is
    a module of the architecture, its weights are overwritten."""
    encoder = inputs.encoder.to(inputs.device)

    def models():
        for name, state, head, data in zip(inputs.tasks, inputs.finetuned, inputs.heads, inputs.train, strict=True):
            encoder.load_state_dict(state)
            yield state, diagonal_fisher(encoder, head, data, settings.examples, inputs.seed, settings.estimator,
                                         settings.batch_size, inputs.budget_mib, desc=f"fisher {name}")

    return MergedState(fisher_average(models(), settings.min_fisher, settings.normalize))
