"""Out-of-core merging over the task-vector store (docs/architecture.md): the generic
streaming engine; the merging methods (:mod:`pipeline.merging`) supply the reducers.

A merge is a *reducer* applied to (K, n) blocks of the K task vectors, chunk by chunk. The
contract, which :func:`run` drives, is three methods:

* ``prepare(reader)``: the statistics passes, if any, before the apply pass; they read the
  store through ``reader.blocks(spans, desc)`` and may wrap per-block work in ``reader.op``
  (a linear combination needs none; TIES, in :mod:`pipeline.merging.ties_merging`, computes
  exact top-k thresholds here);
* ``__call__(key, span, block)``: the merged (n,) fp32 values of the entries ``span`` of
  tensor ``key`` from their (K, n) fp32 ``block``, called once per chunk in store order;
* ``patches()``: after the apply pass, ``(key, flat indices, merged values)`` that overwrite
  entries whose value only the whole pass could decide (TIES: exact sign cancellations
  under a negative majority), else an empty list.

A reducer whose ``whole_tensors`` attribute is true (per-matrix methods: an SVD or an
optimisation per weight matrix) gets one block per tensor instead of chunks: ``span`` covers
the whole tensor and the (K, n) block reshapes to the tensor's K task matrices. Those blocks
are read by the same prefetching reader within the budget; a tensor whose K task vectors
take more than half the budget is still read whole (one block in flight, with a warning).

:class:`Linear` (sum_k c_k tau_k, one coefficient per task or per task and tensor) is the
reducer of weight averaging, Task Arithmetic, task negation and learned layer-wise
coefficients: one pass over the store. On CPU, large merges run the per-block work through
``torch.compile`` (``Reader.op``: one fused loop instead of a dozen eager passes;
bit-identical). Reads run in a thread pool ahead of the compute, holding at most half a
memory budget's worth of blocks; the merged model is written tensor by tensor into a
safetensors file (:class:`pipeline.models.checkpoints.SafetensorsWriter`). Memory: the
budget, one pretrained tensor, and what the reducer's statistics keep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pipeline.models.checkpoints import SafetensorsWriter, readable
from pipeline.store.task_vectors import TaskVectorStore

DEFAULT_BUDGET_MIB = 1024
COMPILE_MIN_ENTRIES = 1 << 26  # K x N from which CPU merges compile their per-block work
Block = tuple[str, slice, torch.Tensor]
log = logging.getLogger(__name__)


def _size(n_bytes: float) -> str:
    """A size in MiB, or in KiB below 1 MiB, with the digits that tell it apart."""
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.4g} KiB"
    return f"{n_bytes / 2**20:.4g} MiB"


@functools.cache
def _return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 256 KiB: blocks allocated by the reader threads and freed
    by the main thread then go back to the OS instead of piling up in per-thread arenas
    (glibc otherwise raises the threshold after the first frees, and RSS grows with the data)."""
    try:
        glibc = "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return
    libc = ctypes.util.find_library("c")
    if glibc and libc:
        ctypes.CDLL(libc).mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD


@dataclass
class Reader:
    """Prefetching block reader: ``workers`` threads read ahead as many (K, n) blocks as
    fit in half of ``budget_mib`` (the other half is for the compute)."""

    store: TaskVectorStore
    budget_mib: float = DEFAULT_BUDGET_MIB
    workers: int = 2
    device: torch.device | str = "cpu"
    compile: bool | None = None  # compile the CPU per-block work (None: for large stores)
    whole_tensors: bool = False  # blocks of whole tensors (one span per tensor), not chunks
    bytes_read: int = 0
    passes: int = 0

    def __post_init__(self):
        size, budget = max(span.stop - span.start for _, span in self.spans()), self.budget_mib * 2**20
        block = size * len(self.store.tasks) * 4
        self.depth = int(budget / 2 // block)
        if self.depth < 1 and not self.whole_tensors:
            raise ValueError(f"a block of {len(self.store.tasks)} task-vector chunks of {self.store.root} takes "
                             f"{_size(block)}, more than half the memory budget of {_size(budget)}: "
                             "raise the budget (merging.budget_mib) or write the store with a smaller "
                             "merging.chunk_mib")
        if self.depth < 1:
            log.warning("the largest tensor's %d task vectors take %s, more than half the memory budget of %s: it "
                        "is read whole all the same (raise merging.budget_mib to bound the memory)",
                        len(self.store.tasks), _size(block), _size(budget))
        self.depth = min(max(self.depth, 1), 16)
        _return_large_frees_to_the_os()
        self._pool = ThreadPoolExecutor(self.workers)

    def spans(self) -> list[tuple[str, slice]]:
        """The spans of a full pass in store order: the store's chunks, or with ``whole_tensors``
        one span per (non-empty) tensor."""
        if self.whole_tensors:
            sizes = ((key, math.prod(self.store.shapes[key])) for key in self.store.keys)
            return [(key, slice(0, n)) for key, n in sizes if n]
        return list(self.store.spans())

    def blocks(self, spans: Sequence[tuple[str, slice]] | None = None, desc: str | None = None) -> Iterator[Block]:
        """Yield ``(key, span, (K, n) fp32 block on the device)`` in order, read ahead."""
        spans = self.spans() if spans is None else list(spans)
        self.passes += 1
        pending: deque = deque()
        it = iter(spans)
        bar = tqdm(total=len(spans), desc=desc, disable=desc is None, mininterval=2,
                   unit="tensor" if self.whole_tensors else "chunk")
        for key, span in it:
            pending.append((key, span, self._pool.submit(self.store.read_block, key, span)))
            if len(pending) >= self.depth:
                break
        while pending:
            key, span, future = pending.popleft()
            block = future.result()
            for nxt in it:
                pending.append((*nxt, self._pool.submit(self.store.read_block, *nxt)))
                break
            self.bytes_read += block.numel() * 4
            bar.update()
            yield key, span, block.to(self.device, non_blocking=True)
        bar.close()

    def op(self, fn: Callable) -> Callable:
        """``fn`` for this reader's blocks: compiled (``torch.compile``) on CPU when the store
        holds at least COMPILE_MIN_ENTRIES entries or ``compile`` is set, else as it is."""
        big = len(self.store.tasks) * self.store.numel() >= COMPILE_MIN_ENTRIES
        if torch.device(self.device).type != "cpu" or not (self.compile if self.compile is not None else big):
            return fn
        return _compiled(fn)

    def close(self) -> None:
        self._pool.shutdown()


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, falling back to ``fn`` (with a warning) where compiling fails,
    e.g. without a C++ compiler."""
    compiled = torch.compile(fn, dynamic=True)
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly
            if state["fn"] is fn:
                raise
            log.warning("torch.compile failed (%s); merging eagerly, several times slower", str(err)[:200])
            state["fn"] = fn
            return fn(*args)
    return call


class Linear:
    """sum_k c_k tau_k with one coefficient per task, or per task and tensor (a mapping from
    key to (K,) coefficients: learned layer-wise lambdas)."""

    def __init__(self, coefficients: Sequence[float] | torch.Tensor | Mapping[str, torch.Tensor]):
        self.coefficients = coefficients if isinstance(coefficients, Mapping) else torch.as_tensor(
            coefficients, dtype=torch.float32)

    def prepare(self, reader: Reader) -> None:
        missing = [k for k in reader.store.keys if isinstance(self.coefficients, Mapping) and k not in self.coefficients]
        if missing:
            raise KeyError(f"layer-wise coefficients lack {len(missing)} tensors of the store, e.g. {missing[:3]}")

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        c = self.coefficients[key] if isinstance(self.coefficients, Mapping) else self.coefficients
        c = c.to(block.device, torch.float32)
        if c.shape != (block.shape[0],):
            raise ValueError(f"{tuple(c.shape)} coefficients for {block.shape[0]} task vectors")
        return c @ block

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return []


class LazyStateDict(Mapping):
    """Read-only mapping over a safetensors file (keys under ``prefix``, prefix removed),
    loading one tensor per access."""

    def __init__(self, path: str | Path, prefix: str = ""):
        self.path, self.prefix = str(path), prefix
        with readable(path):
            self._file = safe_open(self.path, "pt")
        self._keys = [k[len(prefix):] for k in self._file.keys() if k.startswith(prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(self.prefix + key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def check_base(store: TaskVectorStore, pretrained: Mapping[str, torch.Tensor]) -> None:
    """Refuse ``pretrained`` unless it has every tensor of the store, in the store's shapes."""
    for key in store.keys:
        if key not in pretrained:
            raise KeyError(f"the pretrained weights lack tensor {key!r} of the task-vector store {store.root}")
        if tuple(pretrained[key].shape) != store.shapes[key]:
            raise ValueError(f"{key}: pretrained shape {tuple(pretrained[key].shape)}, store has {store.shapes[key]}")


def _whole(reducer) -> bool:
    """Whether ``reducer`` takes whole-tensor blocks (its ``whole_tensors`` attribute)."""
    return bool(getattr(reducer, "whole_tensors", False))


def run(reader: Reader, reducer, sink: Callable[[str, slice, torch.Tensor], None], desc: str) -> None:
    """The reducer's statistics passes, then its apply pass into ``sink(key, span, merged)``."""
    reducer.prepare(reader)
    for key, span, block in reader.blocks(desc=desc):
        sink(key, span, reducer(key, span, block))


def merge_to_memory(store: TaskVectorStore, reducer, budget_mib: float = DEFAULT_BUDGET_MIB,
                    device: torch.device | str = "cpu", desc: str | None = None,
                    compile: bool | None = None) -> dict[str, torch.Tensor]:
    """The merged task vector as full-shape fp32 CPU tensors."""
    out = {k: torch.empty(store.shapes[k], dtype=torch.float32) for k in store.keys}
    reader = Reader(store, budget_mib, device=device, compile=compile, whole_tensors=_whole(reducer))
    try:
        run(reader, reducer, lambda key, span, v: out[key].view(-1)[span].copy_(v), desc)
    finally:
        reader.close()
    for key, index, values in reducer.patches():
        out[key].view(-1)[index] = values
    return out


def merge_to_file(store: TaskVectorStore, reducer, pretrained: Mapping[str, torch.Tensor], out: str | Path,
                  budget_mib: float = DEFAULT_BUDGET_MIB, device: torch.device | str = "cpu",
                  metadata: Mapping[str, str] | None = None, desc: str | None = None,
                  compile: bool | None = None) -> dict:
    """Write pretrained + reducer(task vectors) as safetensors with every key of
    ``pretrained`` (tensors outside the store copied), one block (a chunk, or a whole tensor for
    reducers with ``whole_tensors``) in memory at a time.
    Returns a summary: seconds, passes, bytes read, patched entries."""
    check_base(store, pretrained)
    start = time.perf_counter()
    in_store = set(store.keys)
    specs = [(k, pretrained[k].dtype, tuple(pretrained[k].shape))
             for k in [k for k in pretrained if k not in in_store] + store.keys]
    writer = SafetensorsWriter(out, specs, metadata)
    reader = Reader(store, budget_mib, device=device, compile=compile, whole_tensors=_whole(reducer))
    pending = iter(specs)
    current: dict = {}

    def flush_until(key: str | None) -> None:  # copy tensors that are not in the store, in order
        for name, _, _ in pending:
            if name == key:
                return
            writer.write(name, pretrained[name].reshape(-1))

    def sink(key: str, span: slice, merged: torch.Tensor) -> None:
        if current.get("key") != key:
            flush_until(key)
            current.update(key=key, base=pretrained[key].reshape(-1))
        base = current["base"][span]
        writer.write(key, (base.float() + merged.to(base.device)).to(base.dtype))

    try:
        run(reader, reducer, sink, desc)
        flush_until(None)
        patches = [(k, i, (pretrained[k].reshape(-1)[i].float() + v)) for k, i, v in reducer.patches()]
        writer.close(patches)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    return {"seconds": time.perf_counter() - start, "passes": reader.passes, "bytes_read": reader.bytes_read,
            "patched": sum(len(i) for _, i, _ in patches)}
