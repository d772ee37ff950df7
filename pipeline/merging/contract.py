"""The method contract: what a merging method declares, what it is given, what it returns.

Every method is one module of :mod:`pipeline.merging` with a settings dataclass (defaults
cite their source) and one entry point ``run(inputs, settings) -> Merge``, registered once in
:mod:`pipeline.merging.registry`. The workflow, the CLI, the report and the tests all reach a
method through its registry entry (docs/architecture.md shows how to add one).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from pipeline.store.task_vectors import TaskVectorStore

StateDict = dict[str, torch.Tensor]


class Need(enum.Enum):
    """What a method reads besides the pretrained encoder."""

    TASK_VECTORS = "the task-vector store, streamed"
    MODELS = "the fine-tuned encoders themselves"
    TRAIN_DATA = "labelled training examples of each task"
    TEST_DATA = "unlabeled test images of each task"


class Images(Protocol):
    """One task's unlabeled images as AdaMerging samples them: a float (N, 3, S, S) tensor, or
    any object (e.g. :class:`~pipeline.data.image_cache.UnlabeledImages`, which reads rows from
    disk) with ``len()`` and indexing by a 1-D LongTensor -> float (B, 3, S, S) tensor."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Inputs:
    """Everything a method may use; a method reads only what its ``needs`` name.

    ``finetuned`` may be a lazy sequence (one model loaded per access), so that methods that
    visit the models one at a time hold one in memory."""

    pretrained: Mapping[str, torch.Tensor]  # the pretrained image encoder's state dict
    tasks: Sequence[str] = ()
    store: TaskVectorStore | None = None  # the task vectors of ``tasks``
    encoder: nn.Module | None = None  # a module of the architecture (its weights get overwritten)
    finetuned: Sequence[Mapping[str, torch.Tensor]] = ()
    heads: Sequence[torch.Tensor] = ()  # per task the frozen zero-shot head
    train: Sequence[Dataset] = ()  # per task the labelled training split
    test: Sequence[Images] = ()  # per task unlabeled test images
    base: str | Path | None = None  # a saved merge that the method builds on (Surgery's base merge)
    seed: int = 0
    device: torch.device | str = "cpu"
    budget_mib: float = 1024  # memory for task-vector blocks in flight when streaming
    progress: bool = True
    arch: str | None = None  # the zoo's architecture (settings that count the official encoder's entries)


class Merge(Protocol):
    """A method's result: the merged encoder, in memory or written to a file."""

    def state_dict(self) -> StateDict: ...

    def save(self, path: str | Path) -> dict: ...


@dataclass
class MergedState:
    """A merge computed in memory (methods that need models or data)."""

    merged: StateDict
    details: dict = field(default_factory=dict)  # method-specific outputs (AdaMerging's run, ...)

    def state_dict(self) -> StateDict:
        return self.merged

    def save(self, path: str | Path) -> dict:
        from pipeline.models.checkpoints import save_state_dict

        save_state_dict(self.merged, path)
        return {}


Route = Callable[[str | Path, nn.Module, Sequence[str]], Iterator[nn.Module]]
"""How a task-routed method is evaluated: ``route(saved merge, encoder, tasks)`` yields, task by
task in order, the module that encodes that task's images (``encoder`` is the pretrained
image encoder on the evaluation device; the yielded modules live there too)."""


def load_each(states: Iterator[Mapping[str, torch.Tensor]], encoder: nn.Module) -> Iterator[nn.Module]:
    """``encoder`` with each state dict of ``states`` loaded in turn (a route of methods whose
    per-task models are plain encoder weights: TALL masks, EMR-Merging)."""
    for state in states:
        encoder.load_state_dict(state)
        yield encoder


@dataclass(frozen=True)
class Method:
    """One registry entry: a method's identity, needs, settings and entry point."""

    name: str
    label: str  # display name in tables and figures
    paper: str  # citation of the method's paper
    needs: frozenset[Need]
    settings: type  # a dataclass of the method's settings
    run: Callable[[Inputs, Any], Merge]
    searched: bool = False  # lambda chosen on the validation split (the settings have ``lam``)
    per_task: bool = False  # one model per task (task negation), not one merged model
    synthetic_only: bool = False  # needs what only synthetic zoos have (joint training data)
    table_row: int | None = None  # its row in the AdaMerging paper's Table 1 (None: not there)
    route: Route | None = None  # task identity used at inference: one model per task (see Route)

    def configure(self, values: Mapping[str, Any] | None = None, **overrides) -> Any:
        """The settings from the config's mapping (lists become tuples); unknown keys are
        refused, naming the method and its known settings."""
        values = {**(values or {}), **overrides}
        known = {f.name for f in dataclasses.fields(self.settings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{self.name}: unknown settings {unknown}; known: {sorted(known)}")
        return self.settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def apply_vector(pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                 lam: float) -> StateDict:
    """``pretrained + lam * vector`` in fp32 for the keys of ``vector``, cast back to each
    tensor's dtype; the other tensors of ``pretrained`` are kept."""
    out = dict(pretrained)
    for key, v in vector.items():
        base = pretrained[key]
        out[key] = (base.float() + lam * v.to(base.device)).to(base.dtype)
    return out


def default_device() -> torch.device:
    """CUDA when present (Triton kernels), else CPU (torch twins)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
