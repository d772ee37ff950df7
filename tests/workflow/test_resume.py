"""Kill and resume: a run SIGKILLed while a job writes its outputs resumes to the same results.

A tiny zoo is built once; a copy of it is merged without interruption (the reference). The
other copy is merged twice with the whole Snakemake process group SIGKILLed mid-job:

1. while a task_vector job writes its zarr subgroup (caught while the temporary subgroup
   holds arrays but is not marked complete; at the latest just before its rename into place),
2. while the Task Arithmetic lambda_search job publishes its outputs: the lambda table and
   model.safetensors are in place, model.json is not (a checkpoint that looks finished),
3. while the weight-averaging merge's streaming writer holds its finished temporary file.

Each time the store must not hold the partial subgroup, and Snakemake must treat the killed
job as incomplete; after `--unlock` and `--rerun-incomplete` every task vector, merged model,
settings file and lambda table equals the reference bit for bit, and no temporary file of a
killed writer is left anywhere.

The kill points come from tests/helpers/faults/sitecustomize.py, put on the workflow processes'
PYTHONPATH: it pauses the pipeline's os.replace of a chosen output so the kill lands there.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers.workflow import REPO, snakemake, snakemake_command, tiny_config
from safetensors.torch import load_file

from pipeline.store.task_vectors import TaskVectorStore

# Snakemake marks directory() outputs with a .snakemake_timestamp file, which zarr notes
pytestmark = [pytest.mark.workflow, pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")]

ZOO = "resume"
TASKS = ("colour", "background")
STORE = f"results/{ZOO}/task_vectors.zarr"
MERGES = ("weight_averaging", "task_arithmetic")
TARGETS = [f"{STORE}/{t}" for t in TASKS] + [f"results/{ZOO}/merges/{m}/model.safetensors" for m in MERGES]
ZOO_TARGETS = [f"resources/models/{ZOO}/{kind}/{t}.safetensors" for kind in ("finetuned", "heads") for t in TASKS]


def job_counts(stdout: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (printed by real and dry runs) as {rule: count}."""
    if "Job stats:" not in stdout:
        return {}
    table = stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def partial_subgroup(work: Path) -> Path | None:
    """A temporary task-vector subgroup that holds arrays but is not marked complete."""
    for tmp in (work / f"results/{ZOO}").glob(".task_vectors.zarr.*.tmp"):
        if ".root." in tmp.name:
            continue
        try:
            attrs = json.loads((tmp / "zarr.json").read_text()).get("attributes", {})
            arrays = [p for p in tmp.iterdir() if (p / "zarr.json").exists()]
        except (OSError, ValueError):
            continue  # being written right now
        if arrays and not attrs.get("complete"):
            return tmp
    return None


def run_until_killed(work: Path, configfile: str, pause_at: str, watch_partial: bool = False,
                     timeout: float = 300, extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """Run the merge targets (with ``extra`` arguments) with os.replace paused at ``pause_at``;
    SIGKILL the process group at the pause (or, with ``watch_partial``, as soon as a task-vector
    subgroup is half written). Returns (how, detail)."""
    marker = work / "paused.txt"
    marker.unlink(missing_ok=True)
    cmd, env = snakemake_command("--cores", "1", "--rerun-incomplete", *extra, *TARGETS, "--configfile", configfile,
                                 cwd=work)
    env.update(ADAMERGE_TEST_PAUSE_AT=pause_at, ADAMERGE_TEST_PAUSE_MARKER=str(marker),
               ADAMERGE_TEST_PAUSE_SECONDS=str(timeout),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests/helpers/faults"), env.get("PYTHONPATH")])))
    with open(work / "killed-run.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline, found = time.monotonic() + timeout, None
    try:
        while found is None:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point:\n"
                                     + (work / "killed-run.log").read_text()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no kill point within {timeout} s")
            partial = partial_subgroup(work) if watch_partial else None
            if partial is not None:
                found = ("partial", str(partial))
            elif marker.exists() and marker.read_text().strip():
                found = ("paused", marker.read_text().strip())
            else:
                time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its jobs: one process group
        proc.wait()
        for _ in range(100):  # the killed jobs are gone, not only snakemake
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("processes of the killed run survive")
    return found


def store_digests(store: Path) -> dict[str, str]:
    """sha256 per task subgroup over its attributes and every array's attributes and contents."""
    out = {}
    for task in TASKS:
        group = zarr.open_group(str(store / task), mode="r")
        h = hashlib.sha256(json.dumps(dict(group.attrs), sort_keys=True).encode())
        for key in sorted(group.array_keys()):
            array = group[key]
            h.update(key.encode() + json.dumps(dict(array.attrs), sort_keys=True).encode())
            h.update(np.ascontiguousarray(array[:]).tobytes())
        out[task] = h.hexdigest()
    return out


def safetensors_digest(path: Path) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(load_file(path).items()):
        h.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def results(work: Path) -> dict:
    merges = work / f"results/{ZOO}/merges"
    return {
        "task_vectors": store_digests(work / STORE),
        "models": {m: safetensors_digest(merges / m / "model.safetensors") for m in MERGES},
        "settings": {m: json.loads((merges / m / "model.json").read_text()) for m in MERGES},
        "lambda_search": pd.read_parquet(work / f"results/{ZOO}/lambda_search/task_arithmetic.parquet")
        .to_dict("list"),
    }


def assert_store_holds_only_complete_subgroups(store: Path, tasks) -> None:
    entries = sorted(p.name for p in store.iterdir())
    assert entries == sorted(["zarr.json", *tasks]), entries
    for task in tasks:
        assert zarr.open_group(str(store / task), mode="r").attrs.get("complete") is True


def test_killed_run_resumes_to_the_uninterrupted_results(tmp_path: Path):
    base = tmp_path / "base"
    shutil.copytree(REPO / "config", base / "config")
    # small chunks: a task vector is written in many pieces, so a kill lands inside the write
    configfile = tiny_config(base, ZOO, TASKS, chunk_mib=0.01)
    snakemake("--cores", "2", *ZOO_TARGETS, "--configfile", configfile, cwd=base)
    reference, work = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(base, reference, symlinks=True)
    shutil.copytree(base, work, symlinks=True)
    snakemake("--cores", "2", *TARGETS, "--configfile", configfile, cwd=reference)
    store = work / STORE

    # 1. kill while a task vector is being written
    how1, detail = run_until_killed(work, configfile, rf"task_vectors\.zarr/({'|'.join(TASKS)})$",
                                   watch_partial=True)
    if how1 == "partial":
        killed_task = re.match(r"\.task_vectors\.zarr\.(\w+)\.", Path(detail).name).group(1)
        assert Path(detail).exists()  # the half-written subgroup is left where it was written
    else:
        killed_task = detail.rsplit("/", 1)[1]
    assert not (store / killed_task).exists()
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        TaskVectorStore(store, [killed_task])
    snakemake("--unlock", *TARGETS, "--configfile", configfile, cwd=work)
    plan = snakemake("-n", "--cores", "1", *TARGETS, "--configfile", configfile, cwd=work).stdout
    assert f"wildcards: task={killed_task}" in plan and job_counts(plan).get("task_vector", 0) >= 1

    # 2. kill while task_arithmetic's lambda_search publishes: model.safetensors in place, model.json not
    how, detail = run_until_killed(work, configfile, r"merges/task_arithmetic/model\.json$")
    assert how == "paused"
    merged = work / f"results/{ZOO}/merges/task_arithmetic"
    assert (merged / "model.safetensors").exists() and not (merged / "model.json").exists()
    load_file(merged / "model.safetensors")  # a readable, finished-looking checkpoint...
    snakemake("--unlock", *TARGETS, "--configfile", configfile, cwd=work)
    plan = snakemake("-n", "--cores", "1", *TARGETS, "--configfile", configfile, cwd=work, check=False)
    text = plan.stdout + plan.stderr
    assert plan.returncode != 0 and "IncompleteFilesException" in text, text[-3000:]  # ...that is not trusted
    assert "merges/task_arithmetic/model.safetensors" in text
    assert_store_holds_only_complete_subgroups(store, TASKS)  # both task vectors were finished in run 2

    # 3. kill while the weight-averaging merge's streaming writer has written its temporary file
    how, detail = run_until_killed(work, configfile, r"merges/weight_averaging/model\.safetensors$",
                                   extra=("--forcerun", "merge_task_vectors"))
    assert how == "paused"
    averaged = work / f"results/{ZOO}/merges/weight_averaging"
    assert list(averaged.glob(".model.safetensors.*.tmp")), sorted(p.name for p in averaged.iterdir())
    snakemake("--unlock", *TARGETS, "--configfile", configfile, cwd=work)

    # 4. resume
    resumed = snakemake("--cores", "2", "--rerun-incomplete", *TARGETS, "--configfile", configfile, cwd=work)
    counts = job_counts(resumed.stdout + resumed.stderr)
    assert counts.get("merge_task_vectors") == 1 and counts.get("lambda_search", 0) <= 1, counts
    assert set(counts) <= {"lambda_search", "merge_task_vectors"}, counts
    assert_store_holds_only_complete_subgroups(store, TASKS)
    TaskVectorStore(store, list(TASKS))  # opens: every subgroup complete, one base model
    assert results(work) == results(reference)
    again = snakemake("-n", "--cores", "1", *TARGETS, "--configfile", configfile, cwd=work)
    assert "Nothing to be done" in again.stdout + again.stderr

    leftovers = sorted(str(p.relative_to(work)) for tree in ("results", "resources") for p in (work / tree).rglob("*.tmp"))
    assert not leftovers, leftovers  # the reruns removed what the killed writers left
    print(f"\nkill 1: {'mid-write' if how1 == 'partial' else 'before rename'} task vector of {killed_task}; "
          f"kill 2: lambda_search between model.safetensors and model.json; kill 3: the merge writer's "
          f"temporary file written; resumed jobs {counts}; outputs equal the uninterrupted run; no *.tmp left")
