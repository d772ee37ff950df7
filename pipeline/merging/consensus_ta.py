"""Consensus Task Arithmetic (Wang et al., Localizing Task Information for Improved Model
Merging and Compression, ICML 2024, Sec. 4): theta_pre + lambda * (c * sum_t tau_t), where
the consensus mask c keeps the entries that at least k tasks' TALL masks hold
(:mod:`pipeline.merging.tall_masks`; tau_MTL = sum_t tau_t). One streamed pass."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.merging.tall_masks import Consensus
from pipeline.store.streaming import Linear


@dataclass(frozen=True)
class Settings:
    """``agree``: 2, the paper's k (Sec. 4: removes the "catastrophic" weights no task uses and
    the "selfish" ones only one task uses; the authors' consensus.yaml ``prun_thre_k: 2``);
    ``mask_lambda``: 0.6, the TALL masks' lambda_t (see :mod:`pipeline.merging.tall_masks`);
    ``lam``: 0.3, Task Arithmetic's coefficient without validation (the AdaMerging paper,
    Sec. 5.1); the workflow searches it on validation, as the authors' code does."""

    agree: int = 2
    mask_lambda: float = 0.6
    lam: float = 0.3

    def __post_init__(self):
        if self.agree < 0 or self.mask_lambda < 0:
            raise ValueError(f"consensus needs agree >= 0 and mask_lambda >= 0, got {self.agree}, {self.mask_lambda}")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * consensus-masked sum of the task vectors."""
    base = Linear([1.0] * len(inputs.store.tasks))
    return StreamedMerge(inputs, Consensus(base, settings.agree, settings.mask_lambda), settings.lam,
                         desc="consensus TA")
