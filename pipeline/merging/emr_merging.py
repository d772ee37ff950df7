"""EMR-Merging (Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging,
NeurIPS 2024): Elect, Mask, Rescale.

* Elect: the unified vector tau_uni = gamma_uni * epsilon with gamma_uni = sign(sum_t tau_t)
  and, per entry, epsilon the largest |tau_t| among the tasks whose sign agrees (Eq. 2-3);
* Mask: M_t = (tau_t * tau_uni > 0) (Eq. 4);
* Rescale: lambda_t = sum |tau_t| / sum |M_t * tau_uni| over all entries (Eq. 5), so each
  modulated vector lambda_t * M_t * tau_uni has the L1 mass of tau_t.

Task t's encoder is theta_pre + lambda_t * M_t * tau_uni (the task's identity is known at
inference): a task-routed method, stored as tau_uni once, one bit mask and one scalar per
task (:class:`pipeline.merging.streamed.RoutedMerge`; its save reports the bytes on disk
against K full models). One streamed pass: the rescalers' two L1 sums are accumulated in it
and written last, since the stored vector does not depend on them.

On purpose unlike FusionBench's ``emr_merge`` (and the authors' code): the rescaler's sums run
over all entries, as Eq. 5, not over per-tensor means (which weight each tensor by the
inverse of its size); and a zero sum elects sign 0 (an entry no task moves stays zero),
where FusionBench takes it as negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import RoutedMerge
from pipeline.store.streaming import Reader


def _emr_block(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tau_uni (n,), the masks (K, n) and per task sum |tau_t| and sum |M_t * tau_uni| (fp64)."""
    sign = block.sum(0).sign()
    masks = block * sign > 0
    magnitude = torch.where(masks, block.abs(), 0.0).amax(0)
    l1 = block.abs().sum(1, dtype=torch.float64)
    l1_modulated = torch.where(masks, magnitude, 0.0).sum(1, dtype=torch.float64)
    return sign * magnitude, masks, l1, l1_modulated


@dataclass
class Emr:
    """The routed reducer (:class:`~pipeline.merging.streamed.RoutedMerge`) of EMR-Merging."""

    def prepare(self, reader: Reader) -> None:
        k = len(reader.store.tasks)
        self._l1 = torch.zeros(k, dtype=torch.float64, device=reader.device)
        self._l1_modulated = torch.zeros_like(self._l1)
        self._op = reader.op(_emr_block)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unified, masks, l1, l1_modulated = self._op(block)
        self._l1 += l1
        self._l1_modulated += l1_modulated
        return unified, masks

    def scales(self) -> torch.Tensor:
        """The rescalers lambda_t (0 for a task whose mask is empty everywhere)."""
        return torch.where(self._l1_modulated > 0, self._l1 / self._l1_modulated, 0.0).cpu()


@dataclass(frozen=True)
class Settings:
    """None: EMR-Merging is tuning-free (the paper's title; no hyper-parameter, Sec. 3)."""


def run(inputs: Inputs, settings: Settings = Settings()) -> RoutedMerge:
    """tau_uni, each task's mask and rescaler, streamed from the store (one pass)."""
    return RoutedMerge(inputs, Emr(), desc="EMR-Merging")
