"""The ``report`` verb: the paper-style table, every analysis, the config and the timings."""

from __future__ import annotations

from pathlib import Path

from pipeline.report import write_report


def report(zoo: dict, eval: list[str], config: dict, benchmark_dir: str, markdown: str, html: str, table: str,  # noqa: A002
           analysis: list[str] = (), merges: list[str] = (), runs: dict = {}, log_dir: str = "") -> None:  # noqa: B006
    """Write the report (markdown and HTML) and its accuracy table (parquet); ``analysis``:
    the analysis outputs as NAME=PATH; ``merges``: the main table's merge records (model.json);
    ``runs``: what each table's AdaMerging and analysis merges ran with (pipeline.report.Runs);
    ``log_dir``: the jobs' logs, whose usage lines give each job's exact peak memory."""
    benchmarks = sorted(str(p) for p in Path(benchmark_dir).glob("*/*.tsv"))
    outputs = dict(item.split("=", 1) for item in analysis)
    write_report(eval, config, benchmarks, zoo, Path(markdown), Path(html), Path(table), outputs, merges, runs,
                 log_dir=Path(log_dir) if log_dir else None)
