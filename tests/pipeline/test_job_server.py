"""The job server (pipeline/job_server.py): jobs forked from one warm process behave as fresh
``python -m pipeline`` processes (outputs, exit codes, signals, usage lines), and a job the
server cannot run exactly runs in its own process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import job_server
from pipeline.job_usage import USAGE_LINE

ZOO = {"arch": "synth-vit-tiny", "name": "t", "seed": 0, "source": "synthetic",
       "synthetic": {"sizes": {"train": 16, "val": 8, "test": 8},
                     "domains": {"shared": {"hue_shift": 1.0, "noise": 0.08, "contrast": 0.8},
                                 "specific": {"hue_shift": 0.4, "contrast": 0.2, "texture": 0.1, "noise": 0.04}}}}


def environ(**extra: str) -> dict[str, str]:
    """This process's environment without pytest's per-test variable, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"} | extra


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A job server whose parent is a ``sleep``: (socket path, its log, the parent)."""
    tmp = tmp_path_factory.mktemp("server")
    address, log = tmp / "jobs.sock", tmp / "server.log"
    parent = subprocess.Popen(["sleep", "600"])
    with log.open("w") as out:
        proc = job_server.start(str(address), parent.pid, environ(), out)
    deadline = time.monotonic() + 60
    while "imports done" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    yield address, log, parent
    parent.kill()
    parent.wait()
    proc.wait(timeout=30)


def adamerge(args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def task_data(out: Path) -> list[str]:
    return ["task-data", "--zoo", json.dumps(ZOO), "--task", "colour", "--out", str(out), "--threads", "1"]


def test_a_served_job_writes_what_a_fresh_process_writes(server, tmp_path):
    address, log, _ = server
    served = adamerge(task_data(tmp_path / "served.npz"), environ(**{job_server.ENV: str(address)}))
    _, err = served.communicate(timeout=120)
    fresh = adamerge(task_data(tmp_path / "fresh.npz"), environ())
    fresh.communicate(timeout=120)
    assert served.returncode == fresh.returncode == 0, err
    assert f"adamerge task-data (in {os.getcwd()})" in log.read_text()
    a, b = np.load(tmp_path / "served.npz"), np.load(tmp_path / "fresh.npz")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    (cpu, rss), = USAGE_LINE.findall(err)  # the worker's own usage, in the job's stderr
    assert float(rss) > 100 and float(cpu) >= 0


def test_a_failing_job_exits_with_its_status_and_traceback(server, tmp_path):
    address, *_ = server
    env = environ(**{job_server.ENV: str(address)})
    bad = adamerge(["task-data", "--zoo", "{}", "--task", "colour", "--out", str(tmp_path / "x.npz")], env)
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 1 and "KeyError: 'synthetic'" in err
    unknown = adamerge(["no-such-verb"], env)
    _, err = unknown.communicate(timeout=60)
    assert unknown.returncode == 2 and "invalid choice" in err


def test_a_job_whose_environment_differs_runs_in_its_own_process(server, tmp_path):
    address, *_ = server
    env = environ(**{job_server.ENV: str(address), "HF_HOME": str(tmp_path / "hf")})
    proc = adamerge(task_data(tmp_path / "own.npz"), env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "environment variables differ from the server's: HF_HOME" in err
    assert (tmp_path / "own.npz").exists()
    # Snakemake's per-job thread counts and temporary folder may differ
    assert job_server.env_mismatch(os.environ | {"OMP_NUM_THREADS": "7", "TMPDIR": "/x"}, dict(os.environ)) == []


def _worker_pids(server_log: Path) -> list[int]:
    return [int(line.split("worker ")[1].split(":")[0]) for line in server_log.read_text().splitlines()
            if " worker " in line]


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_job_kills_its_worker(server, tmp_path, kill):
    """Snakemake's SIGTERM reaches the worker through the client; a client killed outright
    takes its worker with it."""
    address, log, _ = server
    zoo = ZOO | {"synthetic": {"pretrain": {"corpus": 4000, "steps": 100000, "batch_size": 64, "lr": 1e-3,
                                            "weight_decay": 0.1, "warmup": 1}}}
    before = set(_worker_pids(log))  # before the client starts: a warm server logs its worker at once
    proc = adamerge(["pretrain", "--zoo", json.dumps(zoo), "--out", str(tmp_path / "p.safetensors"),
                     "--tokenizer", str(tmp_path / "tok.json"), "--threads", "1"],
                    environ(**{job_server.ENV: str(address)}))
    deadline = time.monotonic() + 30
    while not set(_worker_pids(log)) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    (worker,) = set(_worker_pids(log)) - before
    time.sleep(1)
    proc.send_signal(kill)
    proc.communicate(timeout=30)
    assert proc.returncode == (128 + signal.SIGTERM if kill == signal.SIGTERM else -signal.SIGKILL)
    assert _wait_gone(worker)


def test_no_server_means_a_fresh_process(tmp_path):
    env = environ(**{job_server.ENV: str(tmp_path / "absent.sock")})
    proc = adamerge(task_data(tmp_path / "d.npz"), env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and (tmp_path / "d.npz").exists() and "job server" not in err


def test_the_server_exits_with_its_parent(tmp_path):
    address = tmp_path / "s.sock"
    parent = subprocess.Popen(["sleep", "600"])
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = job_server.start(str(address), parent.pid, environ(), out)
    deadline = time.monotonic() + 30
    while not address.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert address.exists()
    parent.kill()
    parent.wait()  # not a zombie: the server polls whether its parent exists
    proc.wait(timeout=60)
    assert proc.returncode == 0 and "0 jobs served" in log.read_text() and not address.exists()
