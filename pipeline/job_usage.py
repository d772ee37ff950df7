"""The usage line that ends every job's log: its CPU time and peak resident memory, written
by :func:`log_usage` (``pipeline.cli.run``) and read back by :func:`logged_usage` (the report's
stage timings). Exact where Snakemake's benchmark samples every 30 s, and the only figure
for a job that ran in the job server (a forked worker Snakemake does not see). Standard
library only."""

from __future__ import annotations

import logging
import re
import resource
from pathlib import Path

USAGE = "job usage: cpu {cpu:.1f} s, peak RSS {rss_mb:.0f} MB"
USAGE_LINE = re.compile(r"job usage: cpu ([\d.]+) s, peak RSS ([\d.]+) MB")


def log_usage() -> None:
    """Log this process's CPU time and peak resident memory, its children's included."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    logging.getLogger(__name__).info(USAGE.format(cpu=cpu, rss_mb=max(own.ru_maxrss, children.ru_maxrss) / 1024))


def logged_usage(log: Path) -> dict[str, float] | None:
    """The CPU seconds and peak RSS (MB) of the last usage line of the job log ``log``, None
    without a log or line."""
    if not log.is_file():
        return None
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        tail = f.read().decode(errors="replace")
    found = USAGE_LINE.findall(tail)
    return {"cpu_s": float(found[-1][0]), "rss_mb": float(found[-1][1])} if found else None
