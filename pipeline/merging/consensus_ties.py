"""Consensus TIES (Wang et al., Localizing Task Information for Improved Model Merging and
Compression, ICML 2024, Sec. 4): theta_pre + lambda * (c * TIES(tau)), where TIES(tau) is the
TIES-merged vector (unscaled) and the consensus mask c keeps the entries that at least k
tasks' TALL masks hold, the masks built against TIES(tau) as tau_MTL (as the authors' code
does with ``use_ties``): m_t = |tau_t| >= lambda_t |TIES(tau) - tau_t| with the untrimmed
tau_t. Reads the store as TIES does (:mod:`pipeline.merging.ties_merging`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.merging.tall_masks import Consensus
from pipeline.merging.ties_merging import Ties, check_trim_and_merge


@dataclass(frozen=True)
class Settings:
    """``agree``: 2 and ``mask_lambda``: 0.6 as :mod:`pipeline.merging.consensus_ta`; ``k``:
    20, TIES' top-k% (the authors' code, ``reset_thresh=20``); ``merge``: "sum", their
    consensus.yaml's ``ties_agg: sum`` (dis-sum); ``lam``: 0.3 (TIES paper, Appendix C.4),
    searched on validation by the workflow."""

    agree: int = 2
    mask_lambda: float = 0.6
    k: float = 20.0
    merge: str = "sum"
    lam: float = 0.3

    def __post_init__(self):
        if self.agree < 0 or self.mask_lambda < 0:
            raise ValueError(f"consensus needs agree >= 0 and mask_lambda >= 0, got {self.agree}, {self.mask_lambda}")
        check_trim_and_merge(self.k, self.merge, "consensus TIES")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * consensus-masked TIES merge of the task vectors."""
    base = Ties(settings.k, settings.merge)
    return StreamedMerge(inputs, Consensus(base, settings.agree, settings.mask_lambda), settings.lam,
                         desc="consensus TIES")
