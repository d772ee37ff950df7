"""TIES merging (trim, elect sign, disjoint merge) with an exact histogram/radix top-k select.

Semantics (those of the TIES reference code), for K task vectors of d entries each and keep-percentage k:

* trim: n_keep = floor(d * k / 100) (exact rational arithmetic on the value of ``k``); the
  threshold of task j is the (d - n_keep)-th smallest |tau_j| (1-based) and every entry with
  |tau_j| >= threshold is kept, so all ties at the threshold are kept. Edges: n_keep == 0
  (e.g. k = 0) makes the threshold the d-th smallest, the maximum, so the entries of maximal
  magnitude are kept (as in the reference code); n_keep == d (k = 100) keeps everything
  (threshold 0). Inputs must be finite.
* ``extra`` zeros: each task vector counted as d + extra entries, the extra ones zero (the
  AdaMerging code flattens its whole ``ImageEncoder``, whose text-side tensors have zero task
  vectors). Zeros sit at the bottom of the magnitude order, so n_keep = floor((d + extra) k / 100)
  and the threshold is the (d - n_keep)-th smallest of the d entries, or 0 (keep everything)
  once n_keep >= d.
* elect: s_i = sign(sum_j trimmed_j,i); an s_i of 0 becomes the majority sign
  sign(sum_i s_i) (one scalar over all entries).
* disjoint merge: tau_j,i "agrees" when trimmed_j,i > 0 where s_i > 0 and trimmed_j,i < 0
  otherwise; "sum" adds the agreeing entries, "mean" divides that sum by the number of
  agreeing entries clamped to at least 1. The per-task disjoint parts (AdaMerging++ input)
  are the agreeing trimmed entries, zero elsewhere.
* sums run sequentially over tasks in fp32, in the kernel and in the twin alike (bit-identical
  outputs); the reference code's torch.sum(dim=0) adds in an unspecified, device-dependent
  order, so merged values can differ from it by fp32 rounding (thresholds, masks, elected
  signs and parts match it exactly).

The data may stream as chunks (K, n_c) of the K x d matrix, all of one dtype and on the
device that computes: ``chunks`` is a callable that returns a fresh iterable of chunks on
every call. Triton passes over the data:

1. thresholds: radix select on the fp32 magnitude bit patterns (monotone for non-negative
   floats), 8 bits per pass from the top: per-task 256-bin histograms of the digit among the
   entries matching the prefix found so far; 4 passes for fp32, 3 for fp16 and 2 for bf16
   (their low fp32 bits are zero).
2. majority sign: one pass counting elected signs.
3. apply (per chunk): trim, elect, disjoint merge and the optional parts, fused.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels._backend import resolve_backend

Chunks = Callable[[], Iterable[torch.Tensor]]

RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS
HIST_BLOCK = 1024
HIST_ITERS = 8  # blocks per histogram program (one atomic flush of the histogram each)
BLOCK = 1024
NUM_WARPS = 4
_LOWEST_BIT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}  # lowest nonzero bit as fp32


class TiesStats(NamedTuple):
    """Global statistics the per-chunk apply pass needs."""

    thresholds: torch.Tensor  # (K,) fp32 magnitude thresholds
    majority: torch.Tensor  # () int32 sign of the sum of elected signs


@triton.jit
def _radix_hist_kernel(x_ptr, prefix_ptr, hist_ptr, n, stride_x, SHIFT: tl.constexpr,
                       HIGH_MASK: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
                       ITERS: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    prefix = tl.load(prefix_ptr + row)
    hist = tl.zeros((NUM_BINS,), tl.int32)
    start = pid.to(tl.int64) * (BLOCK * ITERS)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        sel = mask & ((bits & HIGH_MASK) == prefix)
        hist += tl.histogram((bits >> SHIFT) & (NUM_BINS - 1), NUM_BINS, mask=sel)
    tl.atomic_add(hist_ptr + row * NUM_BINS + tl.arange(0, NUM_BINS), hist, sem="relaxed")


@triton.jit
def _trimmed_sum(x_ptr, thr_ptr, offs, mask, K, stride_x, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    x_ptrs = x_ptr + offs
    for k in range(K):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(tl.abs(x) >= tl.load(thr_ptr + k), x, 0.0)
        x_ptrs += stride_x
    return acc


@triton.jit
def _elect_count_kernel(x_ptr, thr_ptr, count_ptr, n, K, stride_x, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _trimmed_sum(x_ptr, thr_ptr, offs, mask, K, stride_x, BLOCK)
    sign = (s > 0).to(tl.int32) - (s < 0).to(tl.int32)
    tl.store(count_ptr + pid, tl.sum(tl.where(mask, sign, 0), axis=0))


@triton.jit
def _ties_apply_kernel(x_ptr, thr_ptr, maj_ptr, out_ptr, parts_ptr, n, K, stride_x, stride_p,
                       MEAN: tl.constexpr, WRITE_PARTS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _trimmed_sum(x_ptr, thr_ptr, offs, mask, K, stride_x, BLOCK)
    positive = (s > 0) | ((s == 0) & (tl.load(maj_ptr) > 0))
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    x_ptrs = x_ptr + offs
    p_ptrs = parts_ptr + offs
    for k in range(K):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        t = tl.where(tl.abs(x) >= tl.load(thr_ptr + k), x, 0.0)
        agree = tl.where(positive, t > 0, t < 0)
        sel = tl.where(agree, t, 0.0)
        total += sel
        count += agree.to(tl.int32)
        if WRITE_PARTS:
            tl.store(p_ptrs, sel.to(parts_ptr.dtype.element_ty), mask=mask)
            p_ptrs += stride_p
        x_ptrs += stride_x
    if MEAN:
        total = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))
    tl.store(out_ptr + offs, total, mask=mask)


def n_keep(d: int, k: float) -> int:
    """Entries kept per task: floor(d * k / 100), exact for the value of ``k``."""
    if not 0 <= k <= 100:
        raise ValueError(f"k must be a percentage in [0, 100], got {k}")
    return math.floor(Fraction(k) * d / 100)


def _as_chunks(tvs: torch.Tensor | Chunks) -> Chunks:
    return (lambda: (tvs,)) if torch.is_tensor(tvs) else tvs


def _first_chunk(chunks: Chunks) -> torch.Tensor:
    for chunk in chunks():
        return chunk
    raise ValueError("no chunks")


def _check_chunk(chunk: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if chunk.dim() != 2 or chunk.stride(1) != 1 or chunk.dtype not in _LOWEST_BIT:
        raise ValueError("chunks must be (K, n) fp32/fp16/bf16 tensors with unit stride along n; "
                         f"got {tuple(chunk.shape)}, stride {chunk.stride()}, {chunk.dtype}")
    if like is not None and (chunk.shape[0] != like.shape[0] or chunk.dtype != like.dtype):
        raise ValueError("all chunks must have the same number of tasks and dtype")


def _edge_thresholds(d: int, k: float, n_tasks: int, device: torch.device, extra: int = 0) -> torch.Tensor | None:
    """Threshold 0 when every entry is kept (there is no 0-th smallest magnitude)."""
    return torch.zeros(n_tasks, device=device) if n_keep(d + extra, k) >= d else None


def _thresholds_triton(chunks: Chunks, k: float, first: torch.Tensor, extra: int = 0) -> torch.Tensor:
    n_tasks, device = first.shape[0], first.device
    prefix = torch.zeros(n_tasks, dtype=torch.int32, device=device)
    hist = torch.empty((n_tasks, NUM_BINS), dtype=torch.int32, device=device)
    rank = None
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        high_mask = 0x7FFFFFFF & ~((1 << (shift + RADIX_BITS)) - 1)
        hist.zero_()
        for chunk in chunks():
            _check_chunk(chunk, first)
            grid = (triton.cdiv(chunk.shape[1], HIST_BLOCK * HIST_ITERS), n_tasks)
            if grid[0]:
                _radix_hist_kernel[grid](chunk, prefix, hist, chunk.shape[1], chunk.stride(0),
                                         SHIFT=shift, HIGH_MASK=high_mask, NUM_BINS=NUM_BINS,
                                         BLOCK=HIST_BLOCK, ITERS=HIST_ITERS, num_warps=NUM_WARPS)
        cum = hist.cumsum(1)
        if rank is None:  # first pass: every entry is counted
            d = int(cum[0, -1])
            edge = _edge_thresholds(d, k, n_tasks, device, extra)
            if edge is not None:
                return edge
            rank = torch.full((n_tasks,), d - n_keep(d + extra, k) - 1, dtype=torch.int64, device=device)
        digit = (cum <= rank[:, None]).sum(1)  # bin holding the 0-based rank
        below = cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0]
        rank -= torch.where(digit > 0, below, 0)
        prefix |= (digit << shift).to(torch.int32)
        if shift <= _LOWEST_BIT[first.dtype]:
            break
    return prefix.view(torch.float32)


def _thresholds_torch(chunks: Chunks, k: float, extra: int = 0) -> torch.Tensor:
    data = list(chunks())
    for chunk in data:
        _check_chunk(chunk, data[0])
    n_tasks, device = data[0].shape[0], data[0].device
    d = sum(chunk.shape[1] for chunk in data)
    edge = _edge_thresholds(d, k, n_tasks, device, extra)
    if edge is not None:
        return edge
    rank = d - n_keep(d + extra, k)
    return torch.stack([torch.cat([c[j] for c in data]).float().abs().kthvalue(rank).values
                        for j in range(n_tasks)])


def ties_trimmed_sum(chunk: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Sum over tasks, sequential in fp32, of the entries each task keeps: the elected sign's
    argument, as the kernels compute it."""
    acc = torch.zeros(chunk.shape[1], dtype=torch.float32, device=chunk.device)
    for j in range(chunk.shape[0]):
        x = chunk[j].float()
        acc = acc + torch.where(x.abs() >= thresholds[j], x, 0.0)
    return acc


def ties_thresholds(tvs: torch.Tensor | Chunks, k: float, backend: str = "auto", extra: int = 0) -> torch.Tensor:
    """Per-task magnitude thresholds (K,) fp32 of the top ``k`` percent, each task vector counted
    with ``extra`` zeros (see module doc).

    Two exact selects on purpose: the store's (``exact_thresholds``, pipeline/merging/ties_merging.py)
    must keep a fixed memory budget over chunks read from disk; this one works on resident chunks,
    where the twin's kthvalue is the plain reference both are tested against.
    """
    chunks = _as_chunks(tvs)
    first = _first_chunk(chunks)
    if extra < 0:
        raise ValueError(f"extra zeros must be >= 0, got {extra}")
    if resolve_backend(backend, first) == "triton":
        return _thresholds_triton(chunks, k, first, extra)
    return _thresholds_torch(chunks, k, extra)


def ties_majority(tvs: torch.Tensor | Chunks, thresholds: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """Majority sign () int32: sign of the sum over all entries of the elected signs."""
    chunks = _as_chunks(tvs)
    triton_path = resolve_backend(backend, _first_chunk(chunks)) == "triton"
    total = torch.zeros((), dtype=torch.int64, device=thresholds.device)
    for chunk in chunks():
        _check_chunk(chunk)
        if triton_path:
            n = chunk.shape[1]
            counts = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.int32, device=chunk.device)
            if n:
                _elect_count_kernel[(counts.numel(),)](chunk, thresholds, counts, n, chunk.shape[0],
                                                       chunk.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
            total += counts.sum(dtype=torch.int64)
        else:
            total += ties_trimmed_sum(chunk, thresholds).sign().sum(dtype=torch.int64)
    return total.sign().to(torch.int32)


def ties_stats(tvs: torch.Tensor | Chunks, k: float = 20, backend: str = "auto", extra: int = 0) -> TiesStats:
    """Thresholds (``extra`` zeros counted) and majority sign over all chunks (the passes before
    ``ties_apply``; zeros elect no sign, so they leave the majority as it is)."""
    thresholds = ties_thresholds(tvs, k, backend, extra)
    return TiesStats(thresholds, ties_majority(tvs, thresholds, backend))


def _apply_torch(chunk: torch.Tensor, stats: TiesStats, mean: bool,
                 return_parts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    positive = ties_trimmed_sum(chunk, stats.thresholds)
    positive = (positive > 0) | ((positive == 0) & (stats.majority > 0))
    total = torch.zeros(chunk.shape[1], dtype=torch.float32, device=chunk.device)
    count = torch.zeros(chunk.shape[1], dtype=torch.int32, device=chunk.device)
    parts = torch.empty_like(chunk) if return_parts else None
    for j in range(chunk.shape[0]):
        x = chunk[j].float()
        t = torch.where(x.abs() >= stats.thresholds[j], x, 0.0)
        agree = torch.where(positive, t > 0, t < 0)
        sel = torch.where(agree, t, 0.0)
        total = total + sel
        count = count + agree.to(torch.int32)
        if parts is not None:
            parts[j] = sel.to(chunk.dtype)
    if mean:
        total = total / count.clamp(min=1).float()
    return total, parts


def _apply_triton(chunk: torch.Tensor, stats: TiesStats, mean: bool,
                  return_parts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_tasks, n = chunk.shape
    out = torch.empty(n, dtype=torch.float32, device=chunk.device)
    parts = torch.empty_like(chunk, memory_format=torch.contiguous_format) if return_parts else None
    if n:
        _ties_apply_kernel[(triton.cdiv(n, BLOCK),)](
            chunk, stats.thresholds, stats.majority, out, out if parts is None else parts, n, n_tasks,
            chunk.stride(0), n if parts is None else parts.stride(0), MEAN=mean,
            WRITE_PARTS=parts is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, parts


def _apply(chunk: torch.Tensor, stats: TiesStats, merge: str, return_parts: bool,
           backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if merge not in ("mean", "sum"):
        raise ValueError(f"merge must be 'mean' or 'sum', got {merge!r}")
    _check_chunk(chunk)
    apply = _apply_triton if resolve_backend(backend, chunk) == "triton" else _apply_torch
    return apply(chunk, stats, merge == "mean", return_parts)


def ties_apply(chunk: torch.Tensor, stats: TiesStats, merge: str = "mean", return_parts: bool = False,
               backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused trim / elect / disjoint merge of one (K, n) chunk given the global ``stats``.

    Returns the merged (n,) fp32 task vector and, with ``return_parts``, the (K, n) per-task
    disjoint parts in the chunk's dtype.
    """
    out, parts = _apply(chunk, stats, merge, return_parts, backend)
    return (out, parts) if return_parts else out


def ties_merge(tvs: torch.Tensor | Chunks, k: float = 20, merge: str = "mean", return_parts: bool = False,
               backend: str = "auto", extra: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TIES-merge K task vectors: (K, N) tensor or chunks callable -> merged (N,) fp32.

    ``merge`` is "mean" (dis-mean, TIES paper) or "sum" (dis-sum, AdaMerging code). With
    ``return_parts`` also returns the (K, N) per-task disjoint parts (AdaMerging++). ``extra``:
    zero entries counted with each task vector when trimming (see module doc).
    """
    chunks = _as_chunks(tvs)
    stats = ties_stats(chunks, k, backend, extra)
    outs, parts = zip(*(_apply(chunk, stats, merge, return_parts, backend) for chunk in chunks()))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if not return_parts:
        return out
    return out, (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
