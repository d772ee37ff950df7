"""The workflow on a real SLURM cluster: every job goes through sbatch.

CI (.ci/run) starts a single-node cluster with scripts/slurm-cluster.sh and sets
ADAMERGE_SLURM=1; then this test must run (and fails when no cluster answers). Without that
variable it runs when the test cluster of scripts/slurm-cluster.sh answers (its slurm.conf
carries the script's marker) and is skipped otherwise: a developer's laptop, or the login node
of a real cluster, where test jobs are not submitted unasked. ADAMERGE_SLURM=0 skips it.

A tiny zoo (one task, a few training steps) is built through the SLURM profile
(workflow/profiles/slurm) and its fine-tuned model evaluated: task data and pretraining, the
zero-shot head, fine-tuning, evaluation (5 jobs in 4 dependency levels; each level costs a
job plus the plugin's status-check backoff, 1 s then +10 s per check, so the test stays
within about 1-2 minutes; the task-vector and merge jobs are covered locally by
tests/workflow/test_workflow.py and tests/workflow/test_resume.py).
The profile is overridden only where a one-node test cluster differs from a real one:
partition, memory and thread caps, accounting (none: --slurm-no-account and squeue instead
of sacct), and a one-second first status check.
"""

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from helpers.workflow import REPO, snakemake, tiny_config

pytestmark = pytest.mark.workflow

ZOO = "slurm"
TASKS = ("colour",)
TARGET = f"results/{ZOO}/eval/individual/colour.parquet"
EXPECTED_JOBS = {"task_data": 1, "pretrain": 1, "zero_shot_head": 1, "finetune": 1, "evaluate_individual": 1}
HEAVY_RULES = ["pretrain", "finetune", "multitask", "adamerging"]


def _default_partition() -> str | None:
    """The cluster's default partition (sinfo marks it with '*'), or None when no SLURM answers."""
    if not (shutil.which("sinfo") and shutil.which("sbatch")):
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    usable = [p for p, state in rows if state.rstrip("*~#") in {"idle", "mix", "alloc", "comp"}]
    default = [p for p in usable if p.endswith("*")]
    chosen = default or usable
    return chosen[0].rstrip("*") if chosen else None


def _test_cluster_configured() -> bool:
    """Whether SLURM's config is the one scripts/slurm-cluster.sh writes for its test cluster."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        return "written by adamerge scripts/slurm-cluster.sh" in conf.read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def partition() -> str:
    requested = os.environ.get("ADAMERGE_SLURM")
    if requested == "0" or (requested != "1" and not (_test_cluster_configured() and _default_partition())):
        pytest.skip("no SLURM test cluster: start one with `scripts/slurm-cluster.sh start` (and set "
                    "ADAMERGE_SLURM=1 to make this test required; .ci/run does both)")
    found = _default_partition()
    if found is None:
        pytest.fail("ADAMERGE_SLURM=1 but no SLURM partition with a usable node answers `sinfo`; "
                    "see `scripts/slurm-cluster.sh status`")
    return found


def test_tiny_workflow_runs_through_sbatch(tmp_path: Path, partition: str):
    work = tmp_path
    shutil.copytree(REPO / "config", work / "config")
    configfile = tiny_config(work, ZOO, TASKS)
    start = time.monotonic()
    proc = snakemake(
        TARGET, "--profile", str(REPO / "workflow/profiles/slurm"), "--configfile", configfile,
        "--slurm-no-account", "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
        "--jobs", "4", "--max-threads", "1", "--retries", "0", "--latency-wait", "10",
        "--default-resources", f"slurm_partition={partition}", "runtime=10", "mem_mb=1000",
        "cpus_per_task=threads",
        "--set-resources", *[f"{rule}:mem_mb=1500" for rule in HEAVY_RULES], cwd=work)
    seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr

    # every requested output, and the zoo behind it
    assert (pd.read_parquet(work / TARGET)["n"] > 0).all()
    for task in TASKS:
        assert (work / f"resources/models/{ZOO}/finetuned/{task}.safetensors").stat().st_size > 0
        assert (work / f"resources/models/{ZOO}/heads/{task}.safetensors").stat().st_size > 0
    assert (work / f"resources/models/{ZOO}/pretrained.safetensors").stat().st_size > 0
    assert (work / f"results/{ZOO}/benchmarks/evaluate/individual_colour.tsv").exists()

    # every job was submitted with sbatch: one SLURM job id per Snakemake job, all COMPLETED
    rule_of = {int(m.group(2)): m.group(1)
               for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:[ \t].*\n)*?[ \t]+jobid: (\d+)$", log, re.M)}
    submitted = {int(m.group(1)): (m.group(2), Path(m.group(3)))
                 for m in re.finditer(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.", log)}
    assert Counter(rule_of[j] for j in submitted) == EXPECTED_JOBS, log[-6000:]
    assert "localrule" not in log
    for slurm_id, slurm_log in submitted.values():
        slurm_log = slurm_log if slurm_log.is_absolute() else work / slurm_log
        assert slurm_log.exists() and slurm_log.name == f"{slurm_id}.log"
    ids = ",".join(slurm_id for slurm_id, _ in submitted.values())
    states = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %T", "--jobs", ids],
                            capture_output=True, text=True, timeout=30).stdout.split("\n")
    states = dict(line.split() for line in states if line.strip())
    assert states == {slurm_id: "COMPLETED" for slurm_id, _ in submitted.values()}
    # the rules' own logs came back through the shared filesystem
    assert (work / f"logs/{ZOO}/pretrain/pretrain.log").exists()
    print(f"\nSLURM tiny workflow: {len(submitted)} sbatch jobs in {seconds:.0f} s "
          f"(slurm job ids {ids})")
