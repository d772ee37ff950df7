"""Merges that stream the task-vector store: the result type of the methods that need only
task vectors (weight averaging, Task Arithmetic, TIES-Merging, task negation, and the
per-matrix methods TSV-M, Iso-C, Iso-CTS and WUDI through :class:`PerMatrix`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.merging.contract import Inputs, StateDict, apply_vector
from pipeline.store.streaming import merge_to_file, merge_to_memory


@dataclass
class StreamedMerge:
    """pretrained + ``lam`` * reducer(task vectors), streamed from the store chunk by chunk.

    ``vector()`` is the reducer's merged task vector (unscaled); searched methods choose
    ``lam`` on it, the others fold their coefficients into the reducer and keep ``lam`` 1."""

    inputs: Inputs
    reducer: Any  # a reducer of pipeline.store.streaming (prepare, __call__, patches)
    lam: float = 1.0
    desc: str | None = None

    def vector(self) -> StateDict:
        return merge_to_memory(self.inputs.store, self.reducer, self.inputs.budget_mib, self.inputs.device,
                               desc=self.desc)

    def state_dict(self) -> StateDict:
        return apply_vector(self.inputs.pretrained, self.vector(), self.lam)

    def save(self, path: str | Path) -> dict:
        """Write the merged encoder as safetensors within the memory budget; returns the
        engine's summary (seconds, passes, bytes read)."""
        reducer = self.reducer if self.lam == 1.0 else Scaled(self.reducer, self.lam)
        return merge_to_file(self.inputs.store, reducer, self.inputs.pretrained, path, self.inputs.budget_mib,
                             self.inputs.device, desc=self.desc)


@dataclass
class Scaled:
    """``lam`` times another reducer's output (and its patches)."""

    reducer: Any
    lam: float

    @property
    def whole_tensors(self) -> bool:
        return bool(getattr(self.reducer, "whole_tensors", False))

    def prepare(self, reader) -> None:
        self.reducer.prepare(reader)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        return self.lam * self.reducer(key, span, block)

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(key, index, self.lam * values) for key, index, values in self.reducer.patches()]


def is_matrix(key: str, shape: tuple[int, ...]) -> bool:
    """Every 2-D tensor: what the TSV and Iso papers' code (and FusionBench) merge per matrix."""
    return len(shape) == 2


@dataclass
class PerMatrix:
    """A whole-tensor reducer of :mod:`pipeline.store.streaming`: ``matrix((K, m, n) task
    matrices) -> (m, n)`` for each tensor that ``select(key, shape)`` picks, the mean of the K
    task vectors for every other tensor (as the papers' code does; scale both through
    :class:`StreamedMerge`'s ``lam``). One tensor of all K task vectors is in memory at a time."""

    matrix: Callable[[torch.Tensor], torch.Tensor]
    select: Callable[[str, tuple[int, ...]], bool] = is_matrix
    whole_tensors = True
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def prepare(self, reader) -> None:
        self.shapes = reader.store.shapes

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        shape = self.shapes[key]
        if (span.start, span.stop) != (0, torch.Size(shape).numel()):
            raise ValueError(f"{key}: a per-matrix reducer needs whole tensors, got entries {span} of {shape}")
        if not self.select(key, shape):
            return block.mean(0)
        return self.matrix(block.view(len(block), *shape)).reshape(-1)

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return []
