"""Task negation (Ilharco et al., ICLR 2023): theta_pre + lambda * sum_k tau_k with
lambda < 0, which makes the model forget the negated tasks (the store holds those tasks)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.store.streaming import Linear


@dataclass(frozen=True)
class Settings:
    """``lam``: -1.0, the negation coefficient of Ilharco et al. (2023, Sec. 3)."""

    lam: float = -1.0

    def __post_init__(self):
        if self.lam >= 0:
            raise ValueError(f"task negation needs a negative lambda, got {self.lam}; use task_arithmetic to add tasks")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre - ``|lam|`` * sum of the store's task vectors."""
    return StreamedMerge(inputs, Linear([settings.lam] * len(inputs.store.tasks)), desc="task negation")
