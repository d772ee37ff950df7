"""Top-1 accuracy of an image encoder with a task's zero-shot head on a task split."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from pipeline.data.image_cache import DecodedImages
from pipeline.models.clip import logits

SLICEABLE = (TensorDataset, DecodedImages)  # datasets indexed by a slice give a whole batch


def batches(dataset: Dataset, batch_size: int) -> DataLoader:
    """The dataset's (images, labels) batches in order: one slice per batch where the dataset
    supports it (an image cache reads a contiguous block), else item by item and collated."""
    if isinstance(dataset, SLICEABLE):
        n = len(dataset)
        return DataLoader(dataset, batch_size=None, sampler=[slice(s, min(s + batch_size, n))
                                                             for s in range(0, n, batch_size)])
    return DataLoader(dataset, batch_size=batch_size)


@torch.no_grad()
def accuracy(encoder: nn.Module, head: torch.Tensor, dataset: Dataset, batch_size: int = 512,
             desc: str = "eval") -> dict[str, float]:
    """Accuracy (%), number of examples and seconds of one encoder on one dataset, computed
    where the encoder's weights are (CPU or GPU); NaN or Inf logits are refused (their
    argmax would give a meaningless accuracy)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    head = head.to(device)
    start = time.perf_counter()
    correct = total = 0
    for x, y in tqdm(batches(dataset, batch_size), desc=desc, leave=False, mininterval=2):
        out = logits(encoder(x.to(device, non_blocking=True)), head)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"{desc}: NaN or Inf logits on examples {total} to {total + len(y) - 1}: the encoder's weights, the "
                "head or the images hold NaN or Inf (a diverged merge or fine-tuning?). Rebuild the model; an "
                "accuracy from these logits would be meaningless")
        correct += (out.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return {"accuracy": 100.0 * correct / max(total, 1), "n": total, "seconds": time.perf_counter() - start}
