"""A warm process that runs the workflow's local jobs: the imports once, one fork per job.

Each job of the workflow is an ``adamerge VERB`` process, and about 8 s of each (idle, 2 cores)
goes to importing torch, open_clip (with torchvision and torch._dynamo), pandas and pyarrow
before any work; most of the demo's 138 jobs work for less than that. With Snakemake's local
executor the workflow starts one server (``onstart`` in ``workflow/rules/common.smk``) and
exports its socket in ``ADAMERGE_JOB_SERVER``. Each ``adamerge`` then hands the server its
arguments, working directory, environment and standard streams and waits; the server forks a
worker from the already imported interpreter, which runs the verb as ``adamerge`` would, and
the client exits with the worker's status, forwarding the signals it gets (Snakemake's job
kill) and killing the worker when it dies itself.

The client runs the job itself, in a fresh interpreter, whenever the server cannot serve it
exactly: no server, another interpreter or package (conda environments, another checkout), or
an environment that differs in anything an import could have read (only the per-job thread
counts and temporary folders that Snakemake sets may differ; they are applied in the worker).
Cluster jobs never see the server: it is only started for local execution.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ENV = "ADAMERGE_JOB_SERVER"
# Set per job by Snakemake's shell (threads, tmpdir) or by the job's shell itself; applied in
# the worker, read by no import the server ran (torch's threads are set from --threads).
PER_JOB_ENV = frozenset({"OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                         "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "TMPDIR", "TMP", "TEMP", "TEMPDIR",
                         "PWD", "OLDPWD", "SHLVL", "_"})
# The server's own: no thread may exist when it forks, so its thread pools stay at one thread
# and pyarrow's jemalloc starts no background thread (jobs' numpy BLAS then runs one thread).
SERVER_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
SERVER_ENV["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
PRELOAD = ("torch", "open_clip", "pandas", "pyarrow.parquet", "safetensors.torch", "tqdm")
_HEADER = struct.Struct("!I")

log = logging.getLogger(__name__)


def identity() -> dict[str, str]:
    """What client and server must share: the interpreter and this package's location."""
    return {"python": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "package": str(Path(__file__).resolve().parent)}


def env_mismatch(job_env: dict[str, str], server_env: dict[str, str]) -> list[str]:
    """Names of the variables (per-job ones aside) that differ between a job and the server."""
    names = (set(job_env) | set(server_env)) - PER_JOB_ENV - set(SERVER_ENV)
    return sorted(k for k in names if job_env.get(k) != server_env.get(k))


def _send(sock: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    packet = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [packet], list(fds))
    else:
        sock.sendall(packet)


def _recv(sock: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (None when the peer closed first) and the descriptors that came with it."""
    buf, fds = b"", []
    if with_fds:
        buf, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
    while len(buf) < _HEADER.size or len(buf) < _HEADER.size + _HEADER.unpack_from(buf)[0]:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None, fds
        buf += chunk
    (size,) = _HEADER.unpack_from(buf)
    return json.loads(buf[_HEADER.size:_HEADER.size + size]), fds


# ---------------------------------------------------------------- client (inside ``adamerge``)

def delegate(argv: Sequence[str]) -> int | None:
    """Run ``adamerge argv`` in the job server named by ``ADAMERGE_JOB_SERVER``; its exit
    status, or None when there is no server or it cannot run this job exactly."""
    address = os.environ.get(ENV)
    if not address:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None  # the server has exited (or never started): run here
    with sock:
        umask = os.umask(0)
        os.umask(umask)
        _send(sock, {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                     "identity": identity()}, fds=(0, 1, 2))
        reply, _ = _recv(sock)
        if reply is None or "refused" in reply:
            if reply is not None:
                sys.stderr.write(f"adamerge: the job server cannot run this job ({reply['refused']}); "
                                 "running it in this process\n")
            return None
        pid = reply["pid"]

        def forward(signum: int, _frame) -> None:  # Snakemake's kill of the job reaches its worker
            os.kill(pid, signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, forward)
        reply, _ = _recv(sock)
    if reply is None:
        sys.stderr.write("adamerge: the job server closed the connection before the job ended\n")
        return 1
    status = reply["status"]
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ---------------------------------------------------------------- server

def start(address: str, parent_pid: int, env: dict[str, str], log) -> subprocess.Popen:
    """Start ``adamerge job-server`` on ``address`` in ``env`` (with the server's own variables
    and ``ADAMERGE_JOB_SERVER``), its output into the open file ``log``, in a session of its
    own (a terminal's Ctrl-C reaches Snakemake and the clients, which forward it)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "job-server", "--address", str(address),
                             "--parent-pid", str(parent_pid)],
                            env=env | {ENV: str(address)} | SERVER_ENV, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _run_worker(request: dict, fds: list[int], set_by_imports: dict[str, str],
                main: Callable[[list[str]], None]) -> None:
    """In the forked worker: become the job's process, run it, exit with its status."""
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"] | set_by_imports)
    os.environ.pop(ENV, None)  # the job runs here, not in a server of its own
    tempfile.tempdir = None  # read TMPDIR again
    logging.root.handlers.clear()  # the job's logging.basicConfig writes to its own stderr
    random.seed()  # as a fresh interpreter would be seeded
    sys.argv = ["adamerge", *request["argv"]]
    code = 0
    try:
        main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            sys.stderr.write(f"{e.code}\n")
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - the job's traceback goes to its log, as in a fresh process
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(code)


def _serve_one(conn: socket.socket, server_env: dict[str, str], set_by_imports: dict[str, str],
               main: Callable[[list[str]], None]) -> None:
    """In the forked runner of one connection: check the request, fork its worker, report."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _recv(conn, with_fds=True)
    if request is None or len(fds) != 3:
        return
    if request["identity"] != identity():
        _send(conn, {"refused": f"the server runs {identity()}, the job {request['identity']}"})
        return
    if differs := env_mismatch(request["env"], server_env):
        _send(conn, {"refused": f"environment variables differ from the server's: {', '.join(differs[:5])}"})
        return
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_worker(request, fds, set_by_imports, main)
    for fd in fds:
        os.close(fd)
    log.info("worker %d: adamerge %s (in %s)", pid, " ".join(request["argv"][:1]), request["cwd"])
    _send(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            _, status = os.waitpid(pid, 0)
            _send(conn, {"status": status})
            return
        if not conn.recv(1 << 12):  # the client died: its job dies with it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return


def serve(address: str, parent_pid: int, run: Callable[[list[str]], None], preload: Sequence[str]) -> None:
    """Import ``preload``, then run each job's argv with ``run`` in a forked worker, listening
    on the Unix socket ``address`` until process ``parent_pid`` (Snakemake) exits; jobs that
    connect before the imports finish wait in the backlog."""
    path = Path(address)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(128)
    try:
        start, start_env = time.perf_counter(), dict(os.environ)
        for module in preload:
            importlib.import_module(module)
        log.info("job server on %s: imports done in %.1f s", address, time.perf_counter() - start)
        if _native_threads() != 1:
            raise RuntimeError(f"the imports started {_native_threads() - 1} threads; forking would be unsafe")
        # what the imports set (open_clip: TOKENIZERS_PARALLELISM, ...), as they would in a job
        set_by_imports = {k: v for k, v in os.environ.items() if start_env.get(k) != v}
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # runners are reaped by the kernel
        listener.settimeout(1.0)
        served = 0
        while _alive(parent_pid):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            if os.fork() == 0:
                listener.close()
                try:
                    _serve_one(conn, start_env, set_by_imports, run)
                finally:
                    os._exit(0)
            conn.close()
            served += 1
        log.info("job server: %d jobs served; process %d has exited", served, parent_pid)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
