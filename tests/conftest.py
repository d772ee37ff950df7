import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.workflow import REPO, snakemake

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """One finished run of the micro config, shared by the workflow tests."""
    work = tmp_path_factory.mktemp("micro")
    shutil.copytree(REPO / "config", work / "config")
    snakemake("--cores", "2", "--configfile", "config/micro.yaml", cwd=work)
    return work
