"""RegMean (Jin et al., 2023): for every linear layer the weight minimising the summed
regression loss of all tasks' layer outputs, W = (sum_k G_k)^-1 sum_k G_k W_k (in the
``y = x W^T`` convention: W^T = (sum G_k)^-1 sum G_k W_k^T), with G_k the Gram matrix of the
layer's inputs on task k's training examples (mean over input rows) and its off-diagonal
entries scaled by ``alpha``. Every other tensor is averaged.

Linear layers are the ``nn.Linear`` modules and, of each ``nn.MultiheadAttention`` (which
does not call its projections as modules), the fused input projection ``in_proj_weight``
(inputs: the attention's query, a forward pre-hook) and ``out_proj.weight`` (inputs: the
attention context, recomputed once with an identity output projection). Only one
fine-tuned model and its Gram matrices are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pipeline.merging.contract import Inputs, MergedState, StateDict

DEFAULT_EXAMPLES = 256
DEFAULT_ALPHA = 0.95


class Grams:
    """Accumulates x^T x and the row count of each linear layer's inputs."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sums[key] = self.sums.get(key, 0) + x.T @ x
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {key: s / self.rows[key] for key, s in self.sums.items()}


def _attention_hooks(name: str, mha: nn.MultiheadAttention, grams: Grams):
    busy = False

    def hook(module, args, kwargs, output):
        nonlocal busy
        if busy:
            return
        query = args[0] if args else kwargs["query"]
        grams.add(f"{name}.in_proj_weight", query)
        proj = module.out_proj
        saved = proj.weight.data, proj.bias.data
        busy = True
        try:  # the attention context: the output with an identity output projection
            proj.weight.data = torch.eye(proj.in_features, dtype=saved[0].dtype, device=saved[0].device)
            proj.bias.data = torch.zeros_like(saved[1])
            grams.add(f"{name}.out_proj.weight", module(*args, **kwargs)[0])
        finally:
            proj.weight.data, proj.bias.data = saved
            busy = False

    return mha.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def recording(module: nn.Module, grams: Grams) -> Iterator[None]:
    """While open, each forward of ``module`` adds the inputs of its linear layers to ``grams``,
    keyed by the weight's state-dict key in ``module``."""
    handles = []
    attention_projs = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.MultiheadAttention):
            if not sub._qkv_same_embed_dim:
                raise ValueError(f"RegMean: attention {name} has separate q/k/v projections; not supported")
            handles.append(_attention_hooks(name, sub, grams))
            attention_projs.add(sub.out_proj)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and sub not in attention_projs:
            handles.append(sub.register_forward_pre_hook(
                lambda m, args, key=f"{name}.weight": grams.add(key, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def example_order(dataset: Dataset, examples: int, seed: int) -> list[int]:
    """The indices of ``examples`` examples of ``dataset`` in a seeded random order."""
    return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:examples].tolist()


@torch.no_grad()
def gram_matrices(encoder: nn.Module, dataset: Dataset, examples: int = DEFAULT_EXAMPLES, batch_size: int = 32,
                  seed: int = 0, desc: str = "gram") -> dict[str, torch.Tensor]:
    """Mean Gram matrix (fp64) of the inputs of every linear layer, keyed by its weight's
    state-dict key, on ``examples`` examples of ``dataset`` in a seeded random order."""
    grams = Grams()
    encoder.eval()
    with recording(encoder, grams):
        loader = DataLoader(Subset(dataset, example_order(dataset, examples, seed)), batch_size=batch_size)
        for x, _ in tqdm(loader, desc=desc, mininterval=2):
            encoder(x)
    return grams.means()


def regmean_average(models: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                    alpha: float = DEFAULT_ALPHA) -> StateDict:
    """RegMean of ``(state dict, Gram matrices)`` pairs, streamed one model at a time."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha}")
    gram_sum, target, total, count, first = {}, {}, {}, 0, None
    for state, grams in models:
        first = first or state
        count += 1
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            if key in grams:
                g = grams[key]
                g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
                gram_sum[key] = gram_sum.get(key, 0) + g
                target[key] = target.get(key, 0) + g @ value.double().T
            else:
                total[key] = total.get(key, 0) + value.double()
    if not count:
        raise ValueError("RegMean needs at least one model")
    out = dict(first)
    for key, v in first.items():
        if key in gram_sum:
            out[key] = torch.linalg.lstsq(gram_sum[key], target[key]).solution.T.to(v.dtype)
        elif key in total:
            out[key] = (total[key] / count).to(v.dtype)
    return out


@dataclass(frozen=True)
class Settings:
    """``examples``: 256 training examples per task whose layer inputs make the Gram matrices
    (FusionBench, fusion_bench_config/method/regmean/clip_regmean.yaml num_regmean_examples);
    ``alpha``: 0.95, the scale of off-diagonal Gram entries: the RegMean paper's reduction
    factor (Jin et al., ICLR 2023, Sec. 3.2), which it tunes on language models only;
    0.95 is FusionBench's value for CLIP image encoders (clip_regmean.yaml
    reduce_non_diagonal_ratio; 0.6 is its GPT-2 value, gpt2_regmean.yaml)."""

    examples: int = DEFAULT_EXAMPLES
    alpha: float = DEFAULT_ALPHA


def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
    """RegMean of the fine-tuned encoders (``inputs.finetuned``, visited one at a time) with
    Gram matrices of their inputs on the training splits; ``inputs.encoder`` is a module of
    the architecture, its weights are overwritten."""
    encoder = inputs.encoder

    def models():
        for name, state, data in zip(inputs.tasks, inputs.finetuned, inputs.train, strict=True):
            encoder.load_state_dict(state)
            yield state, gram_matrices(encoder, data, settings.examples, seed=inputs.seed, desc=f"regmean {name}")

    return MergedState(regmean_average(models(), settings.alpha))
