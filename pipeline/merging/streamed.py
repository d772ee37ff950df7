"""Merges that stream the task-vector store: the result type of the methods that need only
task vectors (weight averaging, Task Arithmetic, TIES-Merging, task negation)."""

from __future__ import annotations

from dataclasses import dataclass
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

    def prepare(self, reader) -> None:
        self.reducer.prepare(reader)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        return self.lam * self.reducer(key, span, block)

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(key, index, self.lam * values) for key, index, values in self.reducer.patches()]
