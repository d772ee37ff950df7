"""Weight averaging: the element-wise mean of the fine-tuned weights, computed as
theta_pre + mean_k tau_k from the task-vector store."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.store.streaming import Linear


@dataclass(frozen=True)
class Settings:
    """Weight averaging has no settings (Wortsman et al., 2022, "model soups": uniform soup)."""


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """Mean of the fine-tuned encoders (tensors outside the store are the pretrained ones)."""
    k = len(inputs.store.tasks)
    return StreamedMerge(inputs, Linear([1.0 / k] * k), desc="weight averaging")
