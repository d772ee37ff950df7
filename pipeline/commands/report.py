"""The ``report`` verb: the paper-style table, every analysis, the config and the timings."""

from __future__ import annotations

from pathlib import Path

from pipeline.report import write_report


def report(zoo: dict, eval: list[str], config: dict, benchmark_dir: str, markdown: str, html: str, table: str,  # noqa: A002
           analysis: list[str] = ()) -> None:
    """Write the report (markdown and HTML) and its accuracy table (parquet); ``analysis``:
    the analysis outputs as NAME=PATH."""
    benchmarks = sorted(str(p) for p in Path(benchmark_dir).glob("*/*.tsv"))
    outputs = dict(item.split("=", 1) for item in analysis)
    write_report(eval, config, benchmarks, zoo, Path(markdown), Path(html), Path(table), outputs)
