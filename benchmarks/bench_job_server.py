"""Per-job start-up with and without the job server (pipeline/job_server.py), same process.

Runs ``--jobs`` small jobs (``adamerge task-data`` of a tiny synthetic task: well under a
second of work, so the wall time is nearly all start-up) one after another as fresh
``python -m pipeline`` processes and then through a job server, and prints the mean wall time
per job, its CPU time and the ratio; the server's own start (its imports, once per workflow run)
is printed beside them.

    .venv/bin/python benchmarks/bench_job_server.py --jobs 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import job_server

ZOO = {"arch": "synth-vit-tiny", "name": "bench", "seed": 0, "source": "synthetic",
       "synthetic": {"sizes": {"train": 16, "val": 8, "test": 8},
                     "domains": {"shared": {"hue_shift": 1.0, "noise": 0.08, "contrast": 0.8},
                                 "specific": {"hue_shift": 0.4, "contrast": 0.2, "texture": 0.1, "noise": 0.04}}}}


def run_jobs(n: int, env: dict[str, str], work: Path) -> tuple[float, float]:
    """Mean wall and CPU seconds (the job's process tree; a served job's worker reports its
    own CPU in its usage line, summed in here) of ``n`` task-data jobs."""
    from pipeline.job_usage import USAGE_LINE

    walls, cpus = [], []
    for i in range(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "task-data", "--zoo", json.dumps(ZOO), "--task",
                               "colour", "--out", str(work / f"{i}.npz"), "--threads", "1"],
                              env=env, capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        logged = float(USAGE_LINE.findall(proc.stderr)[-1][0])
        cpus.append(own if env.get(job_server.ENV) is None else own + logged)
    return sum(walls) / n, sum(cpus) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != job_server.ENV}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fresh_wall, fresh_cpu = run_jobs(args.jobs, env, work)
        address = work / "jobs.sock"
        parent = subprocess.Popen(["sleep", "3600"])
        log = (work / "server.log").open("w")
        start = time.perf_counter()
        server = job_server.start(str(address), parent.pid, env, log)
        while "imports done" not in (work / "server.log").read_text():
            time.sleep(0.05)
        server_start = time.perf_counter() - start
        served_wall, served_cpu = run_jobs(args.jobs, env | {job_server.ENV: str(address)}, work)
        parent.kill()
        parent.wait()
        server.wait()
    print(f"{args.jobs} task-data jobs, one at a time")
    print(f"fresh processes : {fresh_wall:6.2f} s wall, {fresh_cpu:6.2f} s CPU per job")
    print(f"job server      : {served_wall:6.2f} s wall, {served_cpu:6.2f} s CPU per job "
          f"(server start {server_start:.1f} s, once)")
    print(f"ratio fresh / served: {fresh_wall / served_wall:.1f}x wall, {fresh_cpu / served_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
