"""Out-of-core merging over the task-vector store (DESIGN sections 5, 6, 8).

A merge is a *reducer* applied to (K, n) blocks of the K task vectors, chunk by chunk: a
linear combination (weight averaging, Task Arithmetic, task negation, learned layer-wise
coefficients) needs one pass over the store; exact TIES needs statistics first:

1. a sample pass over 16 chunks spread evenly over the entries (about ``sample`` entries per
   task kept) estimates each task's top-k threshold and brackets it with a band;
2. a counting pass counts the entries above the band and collects those inside it, which
   gives the exact threshold (the band holds it) or, when the sample misjudged it, two exact
   histogram passes for that task follow (16-bit digit of the |x| bit pattern, then the
   matching entries);
3. the apply pass trims, elects and merges (``kernels.ties_apply``: Triton on CUDA) with the
   majority sign assumed positive, while it counts the elected signs and keeps the few
   entries whose elected sign is exactly zero although some task kept them; if the majority
   turns out not positive those entries are patched at the end.

So exact TIES reads the store about twice. On CPU, large merges run the per-block work
through ``torch.compile`` (one fused loop instead of a dozen eager passes; bit-identical). Reads run in a thread pool ahead of the compute,
holding at most half a memory budget's worth of blocks; the merged model is written tensor by
tensor into a safetensors file (``models.checkpoints.SafetensorsWriter``). Memory: the budget, one
pretrained tensor, and for TIES the sample (4 MiB per task) and the band's candidates (0.8%
of the store's entries, narrowed to at most an eighth of the budget on very large stores;
the histogram fallback collects one 16-bit bucket per task, which is not bounded).
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from kernels import TiesStats, ties_apply
from kernels.ties_merge import n_keep, ties_trimmed_sum
from pipeline.models.checkpoints import SafetensorsWriter
from pipeline.store.task_vectors import TaskVectorStore

DEFAULT_BUDGET_MIB = 1024
SAMPLE_CHUNKS = 16
COMPILE_MIN_ENTRIES = 1 << 26  # K x N from which CPU merges compile their per-block work
Block = tuple[str, slice, torch.Tensor]
log = logging.getLogger(__name__)
_BITS = 0x7FFFFFFF  # magnitude bits of an fp32 pattern
_LOW = 15  # the histogram fallback's second digit: 16 high bits, then 15 low bits


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
    bytes_read: int = 0
    passes: int = 0

    def __post_init__(self):
        block = max(span.stop - span.start for _, span in self.store.spans()) * len(self.store.tasks) * 4
        self.depth = int(self.budget_mib * 2**20 / 2 // block)
        if self.depth < 1:
            raise ValueError(f"a block of {len(self.store.tasks)} task-vector chunks takes {block / 2**20:.0f} MiB, "
                             f"more than half the memory budget of {self.budget_mib} MiB: raise the budget "
                             f"or write the store with a smaller chunk_mib")
        self.depth = min(self.depth, 16)
        _return_large_frees_to_the_os()
        self._pool = ThreadPoolExecutor(self.workers)

    def blocks(self, spans: Sequence[tuple[str, slice]] | None = None, desc: str | None = None) -> Iterator[Block]:
        """Yield ``(key, span, (K, n) fp32 block on the device)`` in order, read ahead."""
        spans = list(self.store.spans()) if spans is None else list(spans)
        self.passes += 1
        pending: deque = deque()
        it = iter(spans)
        bar = tqdm(total=len(spans), desc=desc, disable=desc is None, mininterval=2, unit="chunk")
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


@dataclass
class Ties:
    """lam * TIES(tau) with top-``k``% trimming and dis-``merge`` (see module doc)."""

    k: float = 20.0
    merge: str = "mean"
    lam: float = 1.0
    sample: int = 1 << 20  # entries per task read by the sample pass (0: no sample)
    band: float = 0.004  # half-width, in quantile, of the band collected around the estimate
    thresholds: torch.Tensor | None = None
    _elected: int = 0
    _ambiguous: list = field(default_factory=list)

    def prepare(self, reader: Reader) -> None:
        self.thresholds = exact_thresholds(reader, self.k, self.sample, self.band)
        self._apply = reader.op(_ties_block)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        thr = self.thresholds.to(block.device)
        out, elected, ambiguous = self._apply(block, thr, self.merge == "mean")
        self._elected += int(elected)
        where = torch.nonzero(ambiguous)[:, 0]
        if len(where):  # exact cancellations: their result depends on the majority sign
            negative = TiesStats(thr, torch.full((), -1, dtype=torch.int32, device=block.device))
            values = ties_apply(block[:, where].contiguous(), negative, self.merge)
            self._ambiguous.append((key, where.cpu() + span.start, self.lam * values.cpu()))
        return self.lam * out

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(key, flat indices, merged values) to overwrite once the majority sign is known."""
        return self._ambiguous if self._elected <= 0 else []


def _ties_block(block: torch.Tensor, thr: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES of one block with the majority sign taken positive, the sum of its elected signs,
    and the entries whose elected sign is zero although a task kept them."""
    positive = TiesStats(thr, torch.ones((), dtype=torch.int32, device=block.device))
    out = ties_apply(block, positive, "mean" if mean else "sum")
    elected = ties_trimmed_sum(block, thr)
    kept = ((block.abs() >= thr[:, None]) & (block != 0)).any(0)
    return out, elected.sign().sum(), (elected == 0) & kept


def _bits(block: torch.Tensor) -> torch.Tensor:
    return block.view(torch.int32) & _BITS


def _count_above(block: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per task the entries whose magnitude bits are above ``hi``."""
    return (_bits(block) > hi[:, None]).sum(1)


def _band_mask(block: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The entries whose magnitude bits are in [lo, hi] (a separate op: fused with the count,
    the compiled loop is several times slower)."""
    bits = _bits(block)
    return (bits >= lo[:, None]) & (bits <= hi[:, None])


def _spread(spans: list[tuple[str, slice]], n: int) -> list[tuple[str, slice]]:
    """The chunks holding ``n`` entry positions spread evenly over all entries."""
    ends = torch.tensor([s.stop - s.start for _, s in spans]).cumsum(0)
    where = torch.arange(n, dtype=torch.float64).add(0.5).mul(int(ends[-1]) / n).long()
    return [spans[i] for i in sorted(set(torch.searchsorted(ends, where, right=True).tolist()))]


def exact_thresholds(reader: Reader, k: float, sample: int = 1 << 20, band: float = 0.004) -> torch.Tensor:
    """Per-task exact top-``k``% magnitude thresholds (the semantics of ``kernels.ties_merge``)."""
    n_tasks, d = len(reader.store.tasks), reader.store.numel()
    keep = n_keep(d, k)
    if keep == d:
        return torch.zeros(n_tasks)
    rank = d - keep  # 1-based rank from below; the threshold is the rank-th smallest |x|
    top = d - rank + 1  # ... the top-th largest
    lo = torch.zeros(n_tasks, dtype=torch.int64)
    hi = torch.full((n_tasks,), -1, dtype=torch.int64)  # empty band: every task falls back
    spans = list(reader.store.spans())
    band = min(band, reader.budget_mib * 2**20 / (64 * n_tasks * d))  # 2 band d K fp32 candidates <= budget / 8
    if sample > 0:
        picked = _spread(spans, SAMPLE_CHUNKS)
        stride = max(1, math.ceil(sum(s.stop - s.start for _, s in picked) / sample))
        rows = zip(*(_bits(b[:, ::stride]).cpu().unbind(0) for _, _, b in reader.blocks(picked, desc="TIES sample")))
        for j, parts in enumerate(rows):
            bits = torch.cat(parts).sort().values
            q = torch.tensor([max(rank / d - band, 0.0), min(rank / d + band, 1.0)], dtype=torch.float64)
            lo[j], hi[j] = bits[(q * (len(bits) - 1)).round().long()].tolist()
            del bits
    above = torch.zeros(n_tasks, dtype=torch.int64)
    inside: list[list[torch.Tensor]] = [[] for _ in range(n_tasks)]
    lo_d, hi_d = lo.to(reader.device, torch.int32), hi.to(reader.device, torch.int32)
    count, band_mask = reader.op(_count_above), reader.op(_band_mask)
    for _, _, block in reader.blocks(spans, desc="TIES thresholds"):
        above += count(block, hi_d).cpu()
        rows, cols = torch.nonzero(band_mask(block, lo_d, hi_d), as_tuple=True)
        values = _bits(block[rows, cols]).cpu()
        for j, part in enumerate(values.split(torch.bincount(rows, minlength=n_tasks).tolist())):
            inside[j].append(part)
    thresholds = torch.empty(n_tasks, dtype=torch.int32)
    missed = []
    for j in range(n_tasks):
        cand = torch.cat(inside[j])
        if above[j] < top <= above[j] + len(cand):
            thresholds[j] = cand.kthvalue(len(cand) - (top - int(above[j])) + 1).values
        else:
            missed.append(j)
    del inside
    if missed:
        thresholds[missed] = _histogram_thresholds(reader, spans, missed, top)
    return thresholds.view(torch.float32)


def _histogram_thresholds(reader: Reader, spans: list, tasks: list[int], top: int) -> torch.Tensor:
    """Exact thresholds of ``tasks`` in two passes: a histogram of the 16 high magnitude bits,
    then the entries in the bucket that holds the top-th largest."""
    hist = torch.zeros(len(tasks), 1 << 16, dtype=torch.int64)
    rows = torch.tensor(tasks, device=reader.device)
    for _, _, block in reader.blocks(spans, desc="TIES histogram"):
        digit = _bits(block[rows]) >> _LOW
        offset = torch.arange(len(tasks), device=block.device)[:, None] << 16
        hist += torch.bincount((digit + offset).reshape(-1), minlength=len(tasks) << 16).view(len(tasks), -1).cpu()
    from_top = hist.flip(1).cumsum(1)  # entries at or above each bucket, from the highest bucket
    bucket = (1 << 16) - 1 - (from_top < top).sum(1)
    above = from_top.gather(1, ((1 << 16) - 2 - bucket).clamp(min=0)[:, None])[:, 0] * (bucket < (1 << 16) - 1)
    inside: list[list[torch.Tensor]] = [[] for _ in tasks]
    for _, _, block in reader.blocks(spans, desc="TIES bucket"):
        for i, j in enumerate(tasks):
            row = _bits(block[j])
            inside[i].append(row[(row >> _LOW) == int(bucket[i])].cpu())
    out = torch.empty(len(tasks), dtype=torch.int32)
    for i in range(len(tasks)):
        cand = torch.cat(inside[i])
        out[i] = cand.kthvalue(len(cand) - (top - int(above[i])) + 1).values
    return out


class LazyStateDict(Mapping):
    """Read-only mapping over a safetensors file (keys under ``prefix``, prefix removed),
    loading one tensor per access."""

    def __init__(self, path: str | Path, prefix: str = ""):
        self.path, self.prefix = str(path), prefix
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


def _check_base(store: TaskVectorStore, pretrained: Mapping[str, torch.Tensor]) -> None:
    for key in store.keys:
        if key not in pretrained:
            raise KeyError(f"the pretrained weights lack tensor {key!r} of the task-vector store {store.root}")
        if tuple(pretrained[key].shape) != store.shapes[key]:
            raise ValueError(f"{key}: pretrained shape {tuple(pretrained[key].shape)}, store has {store.shapes[key]}")


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
    reader = Reader(store, budget_mib, device=device, compile=compile)
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
    ``pretrained`` (tensors outside the store copied), one chunk in memory at a time.
    Returns a summary: seconds, passes, bytes read, patched entries."""
    _check_base(store, pretrained)
    start = time.perf_counter()
    in_store = set(store.keys)
    specs = [(k, pretrained[k].dtype, tuple(pretrained[k].shape))
             for k in [k for k in pretrained if k not in in_store] + store.keys]
    writer = SafetensorsWriter(out, specs, metadata)
    reader = Reader(store, budget_mib, device=device, compile=compile)
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
