"""Task Arithmetic (Ilharco et al., ICLR 2023): theta_pre + lambda * sum_k tau_k."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.store.streaming import Linear


@dataclass(frozen=True)
class Settings:
    """``lam``: 0.3, the AdaMerging paper's Task Arithmetic coefficient when no validation
    data is used (Yang et al., 2024, Sec. 5.1; src/main_task_arithmetic.py); the workflow searches
    it on validation unless merging.lambda_choice is fixed."""

    lam: float = 0.3


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * (the sum of the task vectors, streamed from the store)."""
    return StreamedMerge(inputs, Linear([1.0] * len(inputs.store.tasks)), settings.lam, desc="task arithmetic")
