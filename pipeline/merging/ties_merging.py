"""TIES-Merging (Yadav et al., NeurIPS 2023): trim each task vector to its top-k% magnitudes
(global over all tensors), elect a sign per entry, merge the agreeing entries (dis-mean or
dis-sum), theta_pre + lambda * merged. Exact semantics: ``kernels.ties_merge``.

The store is streamed (:mod:`pipeline.store.streaming`): exact thresholds from a sample and
a counting pass, then the fused trim/elect/merge chunk by chunk (Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.store.streaming import Ties

MERGES = ("mean", "sum")


@dataclass(frozen=True)
class Settings:
    """``k``: 20, the percentage of entries each task vector keeps (TIES paper, Sec. 5,
    "top-20%"); ``merge``: "mean", the paper's disjoint mean ("sum": the AdaMerging code's
    dis-sum); ``lam``: 0.3, the paper's best scaling on validation (Appendix C.4)."""

    k: float = 20.0
    merge: str = "mean"
    lam: float = 0.3

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"TIES merge must be one of {MERGES}, got {self.merge!r}")
        if not 0 <= self.k <= 100:
            raise ValueError(f"TIES k must be a percentage in [0, 100], got {self.k}")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * TIES(task vectors) with top-``k``% trimming and dis-``merge``."""
    return StreamedMerge(inputs, Ties(settings.k, settings.merge, 1.0), settings.lam, desc="TIES")
