"""The ``job-server`` verb: the warm process that runs the workflow's local jobs."""

from __future__ import annotations

from pipeline import job_server as server


def job_server(address: str, parent_pid: int) -> None:
    """Serve ``adamerge`` jobs on the Unix socket ``address`` until process ``parent_pid``
    exits (pipeline/job_server.py); the workflow starts it for local execution."""
    server.serve(address, parent_pid)
