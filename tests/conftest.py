import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def snakemake(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the project's workflow with the venv's snakemake in ``cwd``."""
    exe = Path(sys.executable).parent / "snakemake"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(exe), "-s", str(REPO / "Snakefile"), "-d", str(cwd), *args],
                          cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """One finished run of the micro config, shared by the workflow tests."""
    work = tmp_path_factory.mktemp("micro")
    shutil.copytree(REPO / "config", work / "config")
    snakemake("--cores", "2", "--configfile", "config/micro.yaml", cwd=work)
    return work
