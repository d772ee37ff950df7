"""A model's floating-point weights as one flat vector, and the model run on views of it.

AdaMerging builds the merged weights per step in one operation (``kernels.weighted_sum``:
one (N,) vector on CUDA, one tensor per parameter on the CPU) and runs the encoder on views
of them through ``torch.func.functional_call``: no state dict is rebuilt and no weight is
copied. Views of a flat vector come from one ``split`` whose backward is a single
concatenation, so the gradient of the flat vector costs O(N).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")


@dataclass(frozen=True)
class FlatLayout:
    """Where each floating-point tensor of a state dict lives in the flat vector: tensor
    ``names[l]`` of ``shapes[l]`` occupies ``[offsets[l], offsets[l+1])``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> FlatLayout:
        """The layout of the floating-point entries of ``state_dict``, in its order."""
        items = [(k, v) for k, v in state_dict.items() if v.is_floating_point()]
        if not items:
            raise ValueError("the state dict has no floating-point tensor to flatten")
        offsets = [0]
        for _, v in items:
            offsets.append(offsets[-1] + v.numel())
        return cls(tuple(k for k, _ in items), tuple(v.shape for _, v in items),
                   tuple(v.dtype for _, v in items), tuple(offsets))

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:])]

    def block_index(self, segment: int) -> int | None:
        """Transformer block of tensor ``segment`` (``...resblocks.{i}...``), None outside blocks."""
        match = _BLOCK.search(self.names[segment])
        return int(match.group(1)) if match else None

    def flatten(self, state_dict: Mapping[str, torch.Tensor], out: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layout's tensors of ``state_dict`` concatenated into an (N,) vector (into ``out``)."""
        missing = [k for k in self.names if k not in state_dict]
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} tensors of the layout, e.g. {missing[:3]}")
        for name, shape in zip(self.names, self.shapes):
            if state_dict[name].shape != shape:
                raise ValueError(f"{name}: shape {tuple(state_dict[name].shape)}, layout has {tuple(shape)}")
        dtype = out.dtype if out is not None else dtype
        parts = [state_dict[k].reshape(-1).to(dtype) for k in self.names]
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped as the layout's tensors (no copies)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"flat vector of shape {tuple(flat.shape)}, layout has {self.numel} entries")
        return self.shaped(flat.split(self.sizes))

    def shaped(self, parts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layout's tensors from ``parts``, one 1-D tensor per tensor, as shaped views."""
        if [p.numel() for p in parts] != self.sizes:
            raise ValueError(f"{len(parts)} parts do not match the layout's {len(self.names)} tensor sizes")
        return {k: part.view(shape) for k, shape, part in zip(self.names, self.shapes, parts)}

    def state_dict(self, flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CPU state dict with the keys of ``like``: the layout's tensors copied from ``flat``
        in their original dtypes, the other (non-float) entries taken from ``like``."""
        views = self.unflatten(flat.detach())
        dtypes = dict(zip(self.names, self.dtypes))
        return {k: views[k].to(device="cpu", dtype=dtypes[k], copy=True) if k in views else v
                for k, v in like.items()}


def functional_forward(module: nn.Module, layout: FlatLayout, parts: Sequence[torch.Tensor],
                       args: Sequence[object]) -> torch.Tensor:
    """``module(*args)`` with the layout's tensors replaced by ``parts`` (one 1-D tensor per
    layout tensor, e.g. ``flat.split(layout.sizes)``); the gradient reaches the parts (and
    what they were computed from), not the module's own weights."""
    return functional_call(module, layout.shaped(parts), tuple(args))
