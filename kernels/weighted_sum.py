"""Segmented weighted sum of task vectors (AdaMerging forward) and its lambda gradient.

    out[i] = base[i] + sum_k lambdas[k, seg(i)] * tvs[k, i],   seg(i) = l for off[l] <= i < off[l+1]

over the concatenation of all parameter tensors of a model (one segment per tensor for
layer-wise AdaMerging, a single segment for task-wise), in one launch. Backward:

    d loss / d lambdas[k, l] = sum_{i in segment l} grad_out[i] * tvs[k, i]

as per-block partial dot products followed by a fixed-order segmented reduction
(deterministic: no float atomics). Gradients flow to ``lambdas`` only.

Programs are laid out segment-aligned (a block never straddles two segments), so every
program reads K lambda scalars instead of a per-element segment index.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from itertools import pairwise

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._backend import resolve_backend

BLOCK = 1024  # elements per program in the elementwise kernels
RBLOCK = 128  # block partials per step in the segmented reduction
NUM_WARPS = 4


@triton.jit
def _block_offsets(blk_seg_ptr, blk_start_ptr, off_ptr, pid, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Segment, element offsets and mask of program ``pid``."""
    seg = tl.load(blk_seg_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(off_ptr + seg + 1)
    if ALIGNED:  # all segment offsets are multiples of 16: vectorized loads
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    offs = start + tl.arange(0, BLOCK)
    return seg, offs, offs < end


@triton.jit
def _weighted_sum_fwd_kernel(base_ptr, tv_ptr, lam_ptr, out_ptr, blk_seg_ptr, blk_start_ptr, off_ptr,
                             K, L, stride_tv, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg, offs, mask = _block_offsets(blk_seg_ptr, blk_start_ptr, off_ptr, pid, ALIGNED, BLOCK)
    acc = tl.load(base_ptr + offs, mask=mask, other=0.0)
    tv_ptrs = tv_ptr + offs
    lam_ptrs = lam_ptr + seg
    for _ in range(K):
        x = tl.load(tv_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(lam_ptrs) * x
        tv_ptrs += stride_tv
        lam_ptrs += L
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _weighted_sum_bwd_kernel(grad_ptr, tv_ptr, part_ptr, blk_seg_ptr, blk_start_ptr, off_ptr,
                             K, stride_tv, n_blocks, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    _seg, offs, mask = _block_offsets(blk_seg_ptr, blk_start_ptr, off_ptr, pid, ALIGNED, BLOCK)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    tv_ptrs = tv_ptr + offs
    part_ptrs = part_ptr + pid
    for _ in range(K):
        x = tl.load(tv_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptrs, tl.sum(g * x, axis=0))
        tv_ptrs += stride_tv
        part_ptrs += n_blocks


@triton.jit
def _segment_reduce_kernel(part_ptr, seg_blk_ptr, grad_lam_ptr, K, L, n_blocks,
                           K_PAD: tl.constexpr, RBLOCK: tl.constexpr):
    seg = tl.program_id(0)
    b0 = tl.load(seg_blk_ptr + seg)
    b1 = tl.load(seg_blk_ptr + seg + 1)
    ks = tl.arange(0, K_PAD)
    acc = tl.zeros((K_PAD, RBLOCK), tl.float32)
    for b in range(b0, b1, RBLOCK):
        cols = b + tl.arange(0, RBLOCK)
        mask = (ks[:, None] < K) & (cols[None, :] < b1)
        acc += tl.load(part_ptr + ks[:, None] * n_blocks + cols[None, :], mask=mask, other=0.0)
    tl.store(grad_lam_ptr + ks * L + seg, tl.sum(acc, axis=1), mask=ks < K)


class _BlockTable:
    """Segment-aligned program layout for fixed offsets, on one device."""

    def __init__(self, offsets: tuple[int, ...], device: torch.device):
        off = torch.tensor(offsets, dtype=torch.int64)
        n_blk = (off[1:] - off[:-1] + BLOCK - 1) // BLOCK
        seg_blk = torch.cat([n_blk.new_zeros(1), n_blk.cumsum(0)])
        blk_seg = torch.repeat_interleave(torch.arange(len(n_blk)), n_blk)
        blk_start = off[blk_seg] + (torch.arange(len(blk_seg)) - seg_blk[blk_seg]) * BLOCK
        self.n_blocks = len(blk_seg)
        self.aligned = all(o % 16 == 0 for o in offsets)
        self.offsets = off.to(device)
        self.seg_blk = seg_blk.to(device=device, dtype=torch.int32)
        self.blk_seg = blk_seg.to(device=device, dtype=torch.int32)
        self.blk_start = blk_start.to(device)


@functools.lru_cache(maxsize=16)
def _block_table(offsets: tuple[int, ...], device: torch.device) -> _BlockTable:
    return _BlockTable(offsets, device)


def _weighted_sum_fwd(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                      table: _BlockTable) -> torch.Tensor:
    out = torch.empty_like(base)
    if table.n_blocks:
        _weighted_sum_fwd_kernel[(table.n_blocks,)](
            base, tvs, lambdas, out, table.blk_seg, table.blk_start, table.offsets,
            tvs.shape[0], lambdas.shape[1], tvs.stride(0), ALIGNED=table.aligned, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return out


def _weighted_sum_bwd(grad_out: torch.Tensor, tvs: torch.Tensor, n_segments: int,
                      table: _BlockTable) -> torch.Tensor:
    k = tvs.shape[0]
    partials = torch.empty((k, table.n_blocks), dtype=torch.float32, device=tvs.device)
    grad_lam = torch.empty((k, n_segments), dtype=torch.float32, device=tvs.device)
    if table.n_blocks:
        _weighted_sum_bwd_kernel[(table.n_blocks,)](
            grad_out, tvs, partials, table.blk_seg, table.blk_start, table.offsets,
            k, tvs.stride(0), table.n_blocks, ALIGNED=table.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _segment_reduce_kernel[(n_segments,)](
        partials, table.seg_blk, grad_lam, k, n_segments, table.n_blocks,
        K_PAD=triton.next_power_of_2(k), RBLOCK=RBLOCK, num_warps=NUM_WARPS)
    return grad_lam


class WeightedSumFunction(torch.autograd.Function):
    """Triton weighted sum; ``backward`` returns the gradient for ``lambdas`` only."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                offsets: tuple[int, ...]) -> torch.Tensor:
        table = _block_table(offsets, base.device)
        ctx.save_for_backward(tvs)
        ctx.table = table
        return _weighted_sum_fwd(base, tvs, lambdas.detach().float().contiguous(), table)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (tvs,) = ctx.saved_tensors
        n_segments = len(ctx.table.offsets) - 1
        grad_lam = _weighted_sum_bwd(grad_out.float().contiguous(), tvs, n_segments, ctx.table)
        return None, None, grad_lam, None


def weighted_sum_reference(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                           offsets: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Torch twin: one matrix-vector product per segment (plain differentiable ops,
    accumulating in ``base.dtype``), so that autograd's backward is one per segment too."""
    off = [int(o) for o in (offsets.tolist() if torch.is_tensor(offsets) else offsets)]
    lam = lambdas.to(base.dtype)
    parts = [torch.addmv(base[a:b], tvs[:, a:b].t().to(base.dtype), lam[:, seg])
             for seg, (a, b) in enumerate(pairwise(off))]
    return torch.cat(parts) if parts else base.clone()


def _checked_offsets(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                     offsets: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """``offsets`` as a tuple of ints, after checking the shapes of the inputs against it."""
    offsets = tuple(int(o) for o in (offsets.tolist() if torch.is_tensor(offsets) else offsets))
    n_tasks, n = tvs.shape
    if base.shape != (n,) or lambdas.shape != (n_tasks, len(offsets) - 1):
        raise ValueError(f"shapes: base {tuple(base.shape)}, tvs {tuple(tvs.shape)}, "
                         f"lambdas {tuple(lambdas.shape)}, {len(offsets)} offsets")
    if offsets[0] != 0 or offsets[-1] != n or any(a > b for a, b in pairwise(offsets)):
        raise ValueError("offsets must increase from 0 to N")
    return offsets


def _check_constants(base: torch.Tensor, tvs: torch.Tensor) -> None:
    if base.requires_grad or tvs.requires_grad:
        raise ValueError("this weighted sum differentiates w.r.t. lambdas only; detach base and tvs")


def weighted_sum(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                 offsets: Sequence[int] | torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``base + sum_k lambdas[k, seg] * tvs[k]`` over segments ``[offsets[l], offsets[l+1])``.

    Args:
        base: (N,) fp32 flattened pretrained weights (a constant).
        tvs: (K, N) task vectors in fp32, bf16 or fp16, unit stride along N (constants).
        lambdas: (K, L) fp32 coefficients, already clamped by the caller; the only input
            that receives a gradient.
        offsets: L+1 increasing ints with offsets[0] = 0 and offsets[-1] = N (a CPU
            sequence or tensor; a CUDA tensor costs a device sync per call).
        backend: "auto" (Triton on CUDA, torch otherwise), "triton" or "torch".

    Returns:
        (N,) merged weights in fp32 (in ``base.dtype`` for the torch twin).
    """
    offsets = _checked_offsets(base, tvs, lambdas, offsets)
    if resolve_backend(backend, base) == "torch":
        return weighted_sum_reference(base, tvs, lambdas, offsets)
    _check_constants(base, tvs)
    return _triton_weighted_sum(base, tvs, lambdas, offsets)


def _triton_weighted_sum(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                         offsets: tuple[int, ...]) -> torch.Tensor:
    """``WeightedSumFunction`` after checking what the kernels need of the (checked) inputs."""
    if base.dtype != torch.float32 or tvs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"base must be fp32 and tvs fp32/bf16/fp16, got {base.dtype}, {tvs.dtype}")
    if not base.is_contiguous() or tvs.stride(1) != 1:
        raise ValueError("base must be contiguous and tvs unit-stride along N")
    return WeightedSumFunction.apply(base, tvs, lambdas, offsets)


def _split_as(x: torch.Tensor, sizes: list[int], dim: int, dtype: torch.dtype) -> Iterable[torch.Tensor]:
    """``x.split(sizes, dim)`` in ``dtype``, one part converted at a time: never a converted
    copy of the whole task-vector matrix (views when ``x`` already has ``dtype``)."""
    parts = x.split(sizes, dim)
    return parts if x.dtype == dtype else (p.to(dtype) for p in parts)


class SegmentWeightedSumFunction(torch.autograd.Function):
    """The weighted sum as one output tensor per segment (torch, for the CPU): forward one
    matrix-vector product per segment into its own tensor, backward one per segment from
    that tensor's gradient. No (N,) buffer and no concatenation in either direction, and the
    outputs are at most one weight tensor large: on the CPU a fresh (N,) buffer per step costs
    its page faults again. Gradients flow to ``lambdas`` only."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                sizes: list[int]) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(tvs)
        ctx.sizes = sizes
        ctx.dtypes = base.dtype, lambdas.dtype
        ctx.set_materialize_grads(False)
        columns = lambdas.detach().to(base.dtype).unbind(1)
        tv_parts = _split_as(tvs.t(), sizes, 0, base.dtype)  # (size_l, K)
        return tuple(torch.addmv(b, t, lam) for b, t, lam in zip(base.split(sizes), tv_parts, columns))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        (tvs,) = ctx.saved_tensors
        dtype, lambdas_dtype = ctx.dtypes
        # one call per segment and nothing else: each no-op reshape or cast is a dispatch,
        # and these run with cold caches right after the encoder's backward
        zero = tvs.new_zeros(tvs.shape[0], dtype=dtype)
        columns = [zero if g is None else torch.mv(t, g if g.dtype == dtype else g.to(dtype))
                   for g, t in zip(grads, _split_as(tvs, ctx.sizes, 1, dtype))]
        grad_lam = torch.stack(columns, 1)  # (K, L)
        return None, None, grad_lam if lambdas_dtype == dtype else grad_lam.to(lambdas_dtype), None


def weighted_sum_segments(base: torch.Tensor, tvs: torch.Tensor, lambdas: torch.Tensor,
                          offsets: Sequence[int] | torch.Tensor, backend: str = "auto") -> list[torch.Tensor]:
    """``weighted_sum`` as a list of L tensors, segment l's merged weights (1-D).

    On CUDA (backend "triton") views of the fused kernel's (N,) output; otherwise
    ``SegmentWeightedSumFunction``. Arguments as for ``weighted_sum``.
    """
    offsets = _checked_offsets(base, tvs, lambdas, offsets)
    _check_constants(base, tvs)
    sizes = [b - a for a, b in pairwise(offsets)]
    if resolve_backend(backend, base) == "torch":
        return list(SegmentWeightedSumFunction.apply(base, tvs, lambdas, sizes))
    return list(_triton_weighted_sum(base, tvs, lambdas, offsets).split(sizes))
