"""DARE (Yu et al., Language Models are Super Mario, ICML 2024): drop each task-vector entry
with probability p, rescale the survivors by 1/(1-p), then merge the dropped task vectors by
Task Arithmetic or TIES-Merging (``base``): theta_pre + lambda * base(dropped tau).

The drop decision of an entry is a counter-based hash of (seed, task name, tensor key, flat
index in the tensor): two rounds of a 32-bit xorshift-multiply mixer (in the style of C.
Wellons' hash prospector) in int64 arithmetic whose products never overflow, so the masks are
the same whatever the store's chunk size or the memory budget, on CPU and CUDA alike, and a
task's mask does not depend on which other tasks are merged. An entry survives when the top
24 bits of its hash are at least round(p * 2^24): probability 1 - p up to 2^-25. The tests
check the survivors' Binomial law and their independence across entries and tasks.

Streaming: the dropped block replaces the block everywhere the base method reads one, its
statistics passes included (TIES' exact top-k thresholds are those of the dropped vectors),
so DARE adds no pass of its own; only (K, n) blocks are ever in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.merging.ties_merging import Ties, check_trim_and_merge
from pipeline.store.streaming import Block, Linear, Reader

BASES = ("task_arithmetic", "ties")
_M32 = 0xFFFFFFFF
_BITS = 24  # hash bits compared with the drop threshold


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) with full avalanche, in place on int64 ``x``: xorshift-multiply
    rounds with odd multipliers below 2^31, so that no product leaves int64."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def _survive(index: torch.Tensor, seeds: torch.Tensor, threshold: int) -> torch.Tensor:
    """(K, n) bool: entry ``index`` (n,) int64 of each task survives; ``seeds`` (K, 2) int64."""
    x = _mix((index & _M32)[None, :] ^ seeds[:, :1])
    x ^= (index >> 32)[None, :] ^ seeds[:, 1:]
    return _mix(x) >= threshold << (32 - _BITS)


def _dare_block(block: torch.Tensor, seeds: torch.Tensor, start: torch.Tensor, threshold: int,
                keep: float) -> torch.Tensor:
    """The (K, n) block with its dropped entries zero and the others divided by ``keep``."""
    index = torch.arange(block.shape[1], device=block.device) + start
    return torch.where(_survive(index, seeds, threshold), block / keep, 0.0)


def task_seeds(seed: int, tasks: Sequence[str], key: str) -> torch.Tensor:
    """(K, 2) int64: the two 32-bit hash seeds of each task's tensor ``key``."""
    rows = []
    for task in tasks:
        digest = hashlib.blake2b(f"{seed}\0{task}\0{key}".encode(), digest_size=8).digest()
        rows.append([int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")])
    return torch.tensor(rows, dtype=torch.int64)


def threshold(p: float) -> int:
    """The hash value below which an entry is dropped."""
    return round(p * 2**_BITS)


def survivors(seed: int, tasks: Sequence[str], key: str, span: slice, p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, n) bool: which entries ``span`` of tensor ``key`` of each task DARE keeps."""
    index = torch.arange(span.start, span.stop, device=device)
    return _survive(index, task_seeds(seed, tasks, key).to(device), threshold(p))


class _Dropped:
    """A reader (:class:`pipeline.store.streaming.Reader`) whose blocks are dropped and
    rescaled: what the base method's statistics passes read."""

    def __init__(self, reader: Reader, drop):
        self._reader, self._drop = reader, drop

    def blocks(self, spans=None, desc: str | None = None) -> Iterator[Block]:
        for key, span, block in self._reader.blocks(spans, desc):
            yield key, span, self._drop(key, span, block)

    def __getattr__(self, name: str):
        return getattr(self._reader, name)


@dataclass
class Dare:
    """DARE of the task vectors fed to the reducer ``base`` (Linear: Task Arithmetic; Ties):
    a reducer of :mod:`pipeline.store.streaming`."""

    base: Any
    p: float
    seed: int
    _seeds: dict = field(default_factory=dict)

    def prepare(self, reader: Reader) -> None:
        self._tasks, self._op = reader.store.tasks, reader.op(_dare_block)
        self.base.prepare(_Dropped(reader, self.drop))

    def drop(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        if key not in self._seeds:
            self._seeds = {key: task_seeds(self.seed, self._tasks, key).to(block.device)}  # one tensor at a time
        start = torch.tensor(span.start, device=block.device)
        return self._op(block, self._seeds[key], start, threshold(self.p), 1.0 - self.p)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        return self.base(key, span, self.drop(key, span, block))

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return self.base.patches()


@dataclass(frozen=True)
class Settings:
    """``p``: 0.5, the drop rate of FusionBench's CLIP configs (fusion_bench_config/method/dare/
    *.yaml, ``sparsity_ratio: 0.5``; the paper's p = 0.9 is for fine-tuned LLMs, whose deltas
    are far smaller than those of CLIP fine-tuned on a vision task); ``base``:
    "task_arithmetic" (dare/task_arithmetic.yaml) or "ties" (dare/ties_merging.yaml); ``k``,
    ``merge``: TIES' trimming and disjoint merge when ``base`` is ties, top-20% as that yaml
    (``threshold: 20``) and the TIES paper's mean as :mod:`pipeline.merging.ties_merging`
    (the yaml uses sum); ``seed``: 0, of the drop masks (a setting, so every verb that merges
    draws the same masks); ``lam``: 0.3, dare/task_arithmetic.yaml's ``scaling_factor``; the
    workflow searches it on validation as it does Task Arithmetic's and TIES' (rescaling keeps
    the expected task vector, so the best lambda is the base method's, which is searched)."""

    p: float = 0.5
    base: str = "task_arithmetic"
    k: float = 20.0
    merge: str = "mean"
    seed: int = 0
    lam: float = 0.3

    def __post_init__(self):
        if not 0 <= self.p < 1:
            raise ValueError(f"DARE drop rate p must be in [0, 1), got {self.p}")
        if self.base not in BASES:
            raise ValueError(f"DARE base must be one of {BASES}, got {self.base!r}")
        check_trim_and_merge(self.k, self.merge, "DARE (base ties)")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * base(DARE(task vectors)), streamed from the store."""
    k = len(inputs.store.tasks)
    base = Linear([1.0] * k) if settings.base == "task_arithmetic" else Ties(settings.k, settings.merge)
    return StreamedMerge(inputs, Dare(base, settings.p, settings.seed), settings.lam, desc=f"DARE {settings.base}")
