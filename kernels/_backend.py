"""Backend choice shared by the kernel dispatch functions."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch" for data living on ``tensor.device``.

    "auto" picks Triton for CUDA tensors and the torch twin otherwise. "triton" on CPU
    tensors needs the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return backend
