"""Merges that stream the task-vector store: the result types of the methods that need only
task vectors, :class:`StreamedMerge` (one merged encoder: weight averaging, Task Arithmetic,
TIES-Merging, task negation, DARE, consensus merging, and the per-matrix methods TSV-M, Iso-C,
Iso-CTS and WUDI through :class:`PerMatrix`) and :class:`RoutedMerge` (one encoder per task,
stored compactly: TALL masks, EMR-Merging)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from pipeline.merging.contract import Inputs, StateDict, apply_vector, load_each
from pipeline.models.checkpoints import SafetensorsWriter, readable
from pipeline.store.streaming import Reader, check_base, merge_to_file, merge_to_memory, run


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


ROUTED_FORMAT = "task-routed masks 1"  # the __metadata__ "format" of a RoutedMerge file
_BITS = torch.arange(8, dtype=torch.uint8)  # bit j of byte b is entry 8 b + j


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(K, n) bool -> (K, ceil(n / 8)) uint8 on the CPU, entry 8 b + j in bit j of byte b (the
    last byte padded with zeros; numpy's packbits, 20x faster than torch ops)."""
    return torch.from_numpy(np.packbits(bits.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of a (m,) uint8 tensor written by :func:`pack_bits`, as bool."""
    return ((packed[:, None] >> _BITS.to(packed.device)) & 1).view(-1)[:n].bool()


@dataclass
class RoutedMerge:
    """A task-routed merge (TALL masks, EMR-Merging): task t's encoder is
    theta_pre + scale_t * mask_t * vector, with one vector for all tasks.

    The reducer (``prepare`` as in :mod:`pipeline.store.streaming`) returns per chunk the
    vector's (n,) fp32 values and the (K, n) bool masks, and after the pass ``scales()``, (K,).
    ``save`` writes the compact form, streamed: per tensor ``vector.{key}`` (fp32), then
    ``mask.{task}.{key}`` (1 bit per entry, :func:`pack_bits`) for each task; ``scales`` last.
    :func:`task_states` rebuilds task t's encoder from it, :func:`route` evaluates it."""

    inputs: Inputs
    reducer: Any
    desc: str | None = None

    def state_dict(self) -> StateDict:
        raise TypeError(f"{self.desc}: a task-routed merge has one encoder per task, not one merged state dict; save() "
                        "it and read task_states(path, pretrained, tasks), or evaluate it through its registry route")

    def save(self, path: str | Path) -> dict:
        """Write the compact form within the memory budget; returns the engine's summary and
        ``storage``: the file's bytes against K full encoders (the fine-tuned models it stands for)."""
        store, start = self.inputs.store, time.perf_counter()
        check_base(store, self.inputs.pretrained)
        tasks, specs = store.tasks, []
        for key in store.keys:
            n = math.prod(store.shapes[key])
            specs += [(f"vector.{key}", torch.float32, store.shapes[key])]
            specs += [(f"mask.{task}.{key}", torch.uint8, (-(-n // 8),)) for task in tasks]
        specs.append(("scales", torch.float32, (len(tasks),)))
        metadata = {"format": ROUTED_FORMAT, "tasks": json.dumps(tasks), "keys": json.dumps(store.keys)}
        writer = SafetensorsWriter(path, specs, metadata)
        reader = Reader(store, self.inputs.budget_mib, device=self.inputs.device)
        current: dict = {"key": None}

        def flush() -> None:  # the masks of the tensor just written, the last byte padded
            if current["key"] is None:
                return
            if current["carry"].shape[1]:
                current["packed"].append(pack_bits(current["carry"]))
            packed = torch.cat(current["packed"], 1)
            for row, task in zip(packed, tasks, strict=True):
                writer.write(f"mask.{task}.{current['key']}", row)

        def sink(key: str, span: slice, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            vector, masks = out
            if key != current["key"]:
                flush()
                current.update(key=key, packed=[], carry=masks[:, :0])
            writer.write(f"vector.{key}", vector.cpu())
            bits = torch.cat([current["carry"], masks], 1)
            whole = bits.shape[1] // 8 * 8
            current["packed"].append(pack_bits(bits[:, :whole]))
            current["carry"] = bits[:, whole:]

        try:
            run(reader, self.reducer, sink, self.desc)
            flush()
            writer.write("scales", self.reducer.scales().float().cpu())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
        size = Path(path).stat().st_size
        full = len(tasks) * sum(v.numel() * v.element_size() for v in self.inputs.pretrained.values())
        return {"seconds": time.perf_counter() - start, "passes": reader.passes, "bytes_read": reader.bytes_read,
                "storage": {"bytes": size, "full_models_bytes": full, "fraction_of_full_models": size / full}}


def task_states(path: str | Path, pretrained: Mapping[str, torch.Tensor],
                tasks: Sequence[str]) -> Iterator[StateDict]:
    """Task by task, ``pretrained`` + scale_t * mask_t * vector from a :class:`RoutedMerge`
    file (fp32, cast back to each tensor's dtype; on the pretrained tensors' device); tasks
    the file holds no mask of are refused, naming the ones it has."""
    with readable(path):
        file = safe_open(str(path), "pt")
    meta = file.metadata() or {}
    if meta.get("format") != ROUTED_FORMAT:
        raise ValueError(f"{path} is no task-routed merge (its metadata format is {meta.get('format')!r}, expected "
                         f"{ROUTED_FORMAT!r}); write it with the merge of a routed method (TALL masks, EMR-Merging)")
    stored, keys = json.loads(meta["tasks"]), json.loads(meta["keys"])
    missing = [t for t in tasks if t not in stored]
    if missing:
        raise ValueError(f"{path} holds the masks of tasks {stored}, not of {missing}: merge again with these tasks")
    foreign = [k for k in keys if k not in pretrained]
    if foreign:
        raise ValueError(f"{path} holds tensors the pretrained encoder lacks, e.g. {foreign[:3]}: the merge was made "
                         "for another architecture")
    scales = file.get_tensor("scales")
    for task in tasks:
        scale = float(scales[stored.index(task)])
        out = dict(pretrained)
        for key in keys:
            base = pretrained[key]
            vector = file.get_tensor(f"vector.{key}").to(base.device)
            if vector.shape != base.shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(vector.shape)}, the pretrained encoder "
                                 f"{tuple(base.shape)}: the merge was made for another architecture")
            mask = unpack_bits(file.get_tensor(f"mask.{task}.{key}").to(base.device), base.numel()).view(base.shape)
            out[key] = (base.float() + scale * torch.where(mask, vector, 0.0)).to(base.dtype)
        yield out


def route(path: str | Path, encoder: nn.Module, tasks: Sequence[str]) -> Iterator[nn.Module]:
    """The route (:data:`pipeline.merging.contract.Route`) of :class:`RoutedMerge` files:
    ``encoder`` holding each task's weights in turn."""
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return load_each(task_states(path, pretrained, tasks), encoder)
