"""RegMean++ (Nguyen et al., 2025): RegMean whose Gram matrices of a block's linear layers are
taken on the merged model's own features: the inputs of block l on task k's examples come
from the already merged blocks 0..l-1, not from fine-tuned model k's.

As FusionBench's ``RegMeanAlgorithmPlusPlus``: the tensors outside the transformer blocks are
averaged (patch, class and position embeddings and ``ln_pre`` before them; here also
``ln_post`` and ``proj`` after them, which FusionBench leaves pretrained), and each task's
examples go through that averaged stem to the first block. Then, block by block, each
fine-tuned model's own block l runs on its task's current inputs X_k (so inside a block the
candidate's sub-layers make the inputs of its later linear layers), the Gram matrices of its
linear layers merge the block as RegMean does (:func:`pipeline.merging.regmean.regmean_average`),
and X_k <- merged block l (X_k).

Memory: every task's block inputs (examples x tokens x width in fp32; 256 ViT-B/32 images:
39 MiB a task), one fine-tuned model and the merged state. The fine-tuned models are visited
one at a time once per block and once for the average (L + 1 passes; a lazy ``finetuned``
reads each checkpoint L + 1 times) rather than held together (K full models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pipeline.merging.contract import Inputs, MergedState
from pipeline.merging.regmean import Grams, example_order, recording, regmean_average

DEFAULT_EXAMPLES = 256
DEFAULT_ALPHA = 0.95
BLOCKS = "transformer.resblocks"  # open_clip's VisionTransformer


class _Stop(Exception):
    """Ends a forward pass at the first block, once its input is taken."""


def blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks, in order (``transformer.resblocks``)."""
    found = getattr(getattr(encoder, "transformer", None), "resblocks", None)
    if not isinstance(found, nn.ModuleList) or not len(found):
        raise ValueError(f"RegMean++ merges block by block: the encoder ({type(encoder).__name__}) needs its blocks "
                         f"in an nn.ModuleList at {BLOCKS}, as open_clip's VisionTransformer has")
    return found


@torch.no_grad()
def first_block_inputs(encoder: nn.Module, dataset: Dataset, examples: int, seed: int,
                       batch_size: int = 32) -> list[torch.Tensor]:
    """The inputs of the encoder's first block on ``examples`` examples of ``dataset`` (the
    seeded order of RegMean), one tensor per batch, on the encoder's device."""
    device = next(encoder.parameters()).device
    taken = []

    def take(module, args):
        taken.append(args[0].detach())
        raise _Stop

    handle = blocks(encoder)[0].register_forward_pre_hook(take)
    try:
        for x, _ in DataLoader(Subset(dataset, example_order(dataset, examples, seed)), batch_size=batch_size):
            try:
                encoder(x.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return taken


def _candidates(block: nn.Module, key: str, finetuned: Sequence[Mapping[str, torch.Tensor]],
                inputs: Sequence[list[torch.Tensor]]):
    """(block ``key`` of each fine-tuned model, the Gram matrices of its linear layers with
    its task's inputs), one model at a time."""
    for state, batches in zip(finetuned, inputs, strict=True):
        own = {name.removeprefix(key): value for name, value in state.items() if name.startswith(key)}
        block.load_state_dict(own)
        grams = Grams()
        with recording(block, grams):
            for x in batches:
                block(x)
        yield own, {name: g.cpu() for name, g in grams.means().items()}


@dataclass(frozen=True)
class Settings:
    """``examples``: 256 training examples per task; ``alpha``: 0.95, the scale of
    off-diagonal Gram entries (both FusionBench's, fusion_bench_config/method/regmean_plusplus/
    clip_regmean_plusplus.yaml num_regmean_examples and reduce_non_diagonal_ratio, the
    values of RegMean on CLIP there; the RegMean++ paper sweeps alpha over 0.1..1.0, its
    code's experiments/hyperparam.sh)."""

    examples: int = DEFAULT_EXAMPLES
    alpha: float = DEFAULT_ALPHA


@torch.no_grad()
def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
    """RegMean++ of the fine-tuned encoders (``inputs.finetuned``, visited one at a time, L + 1
    times) on their training splits, on ``inputs.device``; ``inputs.encoder`` is a module of
    the architecture (an open_clip VisionTransformer), its weights are overwritten."""
    encoder = inputs.encoder.to(inputs.device).eval()
    layers = blocks(encoder)
    merged = regmean_average(((state, {}) for state in inputs.finetuned), settings.alpha)  # no Grams: the mean
    encoder.load_state_dict(merged)
    features = [first_block_inputs(encoder, data, settings.examples, inputs.seed) for data in inputs.train]
    for index, block in enumerate(tqdm(layers, desc="regmean++ blocks", disable=not inputs.progress)):
        key = f"{BLOCKS}.{index}."
        merged_block = regmean_average(_candidates(block, key, inputs.finetuned, features), settings.alpha)
        block.load_state_dict(merged_block)
        merged |= {key + name: value for name, value in merged_block.items()}
        if index + 1 < len(layers):
            features = [[block(x) for x in batches] for batches in features]
    return MergedState(merged)

