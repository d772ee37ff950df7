"""Kernel tests: Triton runs compiled on CUDA, else under the interpreter on CPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must happen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
