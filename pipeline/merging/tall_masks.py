"""TALL masks (Wang et al., Localizing Task Information for Improved Model Merging and
Compression, ICML 2024): with tau_MTL = sum_t tau_t, task t's mask is
m_t = |tau_t| >= lambda_t |tau_MTL - tau_t| (the entries where tau_MTL carries task t's
information), and with the task's identity known at inference, task t's encoder is
theta_pre + m_t * tau_MTL: tau_MTL unscaled, as the authors' code evaluates it (coefficient
1.0; FusionBench's tall_mask does the same). A task-routed method: its merge file holds
tau_MTL once and one packed bit mask per task (:class:`pipeline.merging.streamed.RoutedMerge`),
evaluated through :func:`pipeline.merging.streamed.route`.

This module also holds the masks' other use, consensus merging (:class:`Consensus`, the
reducer of :mod:`pipeline.merging.consensus_ta` and :mod:`pipeline.merging.consensus_ties`):
entries on in fewer than k tasks' masks are removed from the merged vector.

lambda_t: the paper picks it per task from {0.2, ..., 0.6} on the task's validation split;
here one value for all tasks is a setting (no validation pass), 0.6 as FusionBench's
fusion_bench_config/method/tall_mask/task_arithmetic.yaml. The paper's >= is kept (the
authors' code and FusionBench compare with >; they differ only on exact ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import RoutedMerge
from pipeline.store.streaming import Reader

if TYPE_CHECKING:
    from pipeline.store.task_vectors import TaskVectorStore


def task_masks(block: torch.Tensor, merged: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """(K, n) bool TALL masks of the (K, n) task vectors ``block`` for the multi-task vector
    ``merged`` (n,)."""
    return block.abs() >= mask_lambda * (merged[None, :] - block).abs()


def _tall_block(block: torch.Tensor, mask_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    merged = block.sum(0)
    return merged, task_masks(block, merged, mask_lambda)


def _consensus_block(block: torch.Tensor, merged: torch.Tensor, mask_lambda: float, agree: int) -> torch.Tensor:
    """``merged`` where at least ``agree`` tasks' TALL masks are on, else 0."""
    on = task_masks(block, merged, mask_lambda).sum(0)
    return torch.where(on >= agree, merged, 0.0)


def columns(store: TaskVectorStore, key: str, index: torch.Tensor) -> torch.Tensor:
    """The (K, len(index)) task-vector entries ``index`` of tensor ``key``, reading only the
    chunks that hold them."""
    out = torch.empty(len(store.tasks), len(index))
    for name, span in store.spans():
        inside = (index >= span.start) & (index < span.stop) if name == key else None
        if inside is not None and bool(inside.any()):
            out[:, inside] = store.read_block(key, span)[:, index[inside] - span.start]
    return out


@dataclass
class TallMasks:
    """The routed reducer (:class:`~pipeline.merging.streamed.RoutedMerge`) of TALL masks:
    per chunk tau_MTL and the masks, scales 1."""

    mask_lambda: float

    def prepare(self, reader: Reader) -> None:
        self._k, self._op = len(reader.store.tasks), reader.op(_tall_block)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._op(block, self.mask_lambda)

    def scales(self) -> torch.Tensor:
        return torch.ones(self._k)


@dataclass
class Consensus:
    """The multi-task vector of the reducer ``base`` (Linear: Task Arithmetic; Ties) with the
    entries that fewer than ``agree`` tasks' TALL masks hold set to zero: a reducer of
    :mod:`pipeline.store.streaming`. The masks compare each task vector with ``base``'s
    unscaled output, which therefore is the tau_MTL of the masks (the authors' code: the
    TIES-merged vector for Consensus TIES); ``base``'s patches are re-masked from the entries'
    task vectors, read again."""

    base: Any
    agree: int
    mask_lambda: float

    def prepare(self, reader: Reader) -> None:
        self._store, self._op = reader.store, reader.op(_consensus_block)
        self.base.prepare(reader)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        return self._op(block, self.base(key, span, block), self.mask_lambda, self.agree)

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(key, index, _consensus_block(columns(self._store, key, index), values, self.mask_lambda, self.agree))
                for key, index, values in self.base.patches()]


@dataclass(frozen=True)
class Settings:
    """``mask_lambda``: 0.6, one lambda_t for all tasks (FusionBench's tall_mask/
    task_arithmetic.yaml ``tall_mask_lambda: 0.6``; the paper picks each task's from
    {0.2, ..., 0.6} on validation)."""

    mask_lambda: float = 0.6

    def __post_init__(self):
        if self.mask_lambda < 0:
            raise ValueError(f"TALL mask_lambda must be >= 0, got {self.mask_lambda}")


def run(inputs: Inputs, settings: Settings = Settings()) -> RoutedMerge:
    """tau_MTL and each task's TALL mask, streamed from the store (one pass)."""
    return RoutedMerge(inputs, TallMasks(settings.mask_lambda), desc="TALL masks")
