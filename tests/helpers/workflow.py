"""Helpers of the workflow tests: run the project's Snakefile in a scratch directory."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def snakemake_command(*args: str, cwd: Path, repo: Path = REPO,
                      env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment (``env`` added) that run the workflow of ``repo``
    (default: this project) in ``cwd``."""
    exe = Path(sys.executable).parent / "snakemake"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {}))
    return [str(exe), "-s", str(repo / "Snakefile"), "-d", str(cwd), *args], env


def snakemake(*args: str, cwd: Path, check: bool = True, repo: Path = REPO,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the workflow of ``repo`` (default: this project) with the venv's snakemake in ``cwd``
    (``env``: extra environment variables)."""
    cmd, env = snakemake_command(*args, cwd=cwd, repo=repo, env=env)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_config(work: Path, name: str, tasks: tuple[str, ...] = ("colour", "background"), **merging) -> str:
    """Write ``config/{name}.yaml`` in ``work``: config/micro.yaml shrunk to a zoo that builds
    in seconds (two tasks, none held out, a few training steps, one thread per job), with
    ``merging`` settings added; returns its path relative to ``work``."""
    cfg = yaml.safe_load((REPO / "config/micro.yaml").read_text())
    cfg["zoo"].update(name=name, tasks=list(tasks), heldout_tasks=[])
    synthetic = cfg["zoo"]["synthetic"]
    synthetic["sizes"] = {"train": 128, "val": 64, "test": 64}
    synthetic["pretrain"].update(corpus=512, steps=10, batch_size=32, warmup=2)
    synthetic["finetune"].update(steps=5, batch_size=16, warmup=2)
    cfg["threads"] = 1
    cfg.setdefault("merging", {}).update(merging)
    path = work / "config" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"config/{name}.yaml"
