"""The report: accuracy table (rows models, columns tasks + average), config, stage timings;
written as markdown and as one self-contained HTML page."""

from __future__ import annotations

import html
import platform
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import yaml

MODEL_ORDER = ["zeroshot", "individual", "multitask", "weight_averaging", "fisher_merging", "regmean",
               "task_arithmetic", "ties_merging", "adamerging_task_wise", "adamerging_task_wise_plus",
               "adamerging_layer_wise", "adamerging_layer_wise_plus"]
REFERENCES = {"zeroshot", "individual", "multitask"}  # not merges: no bold for them
PACKAGES = ["torch", "open_clip_torch", "snakemake", "zarr", "pyarrow", "triton"]

CSS = """
body{font-family:Georgia,'Times New Roman',serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #333;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.4em}
th,td{padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left}
thead tr{border-top:2px solid #222;border-bottom:1px solid #222}
tbody tr:last-child{border-bottom:2px solid #222}
td.best{font-weight:bold}
pre{background:#f6f6f6;padding:.8em;font-size:.85em;overflow-x:auto}
.ok{color:#17691d}.fail{color:#a11}
"""


def accuracy_table(evals: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Rows models, columns ``tasks`` + Avg. (accuracy %); models missing a task get NaN."""
    sub = evals[evals["task"].isin(tasks)]
    table = sub.pivot_table(index="model", columns="task", values="accuracy", aggfunc="first")
    table = table.reindex(columns=tasks)
    table["Avg."] = table[tasks].mean(axis=1)
    order = [m for m in MODEL_ORDER if m in table.index] + sorted(set(table.index) - set(MODEL_ORDER))
    return table.loc[order]


def stage_timings(benchmarks: list[str]) -> pd.DataFrame:
    """Wall time and peak memory per stage from Snakemake's benchmark files."""
    rows = []
    for path in benchmarks:
        b = pd.read_csv(path, sep="\t")
        stage = Path(path).parent.name
        rows.append({"stage": stage, "job": Path(path).stem, "seconds": float(b["s"].iloc[0]),
                     "max_rss_mb": float(b["max_rss"].iloc[0]) if "max_rss" in b else float("nan")})
    if not rows:
        return pd.DataFrame(columns=["stage", "jobs", "seconds", "max_rss_mb"])
    df = pd.DataFrame(rows)
    return df.groupby("stage").agg(jobs=("job", "count"), seconds=("seconds", "sum"),
                                   max_rss_mb=("max_rss_mb", "max")).reset_index().astype({"jobs": str})


def zoo_checks(table: pd.DataFrame, tasks: list[str], chance: dict[str, float]) -> list[tuple[str, bool]]:
    """The zoo-quality statements of the design, each with whether it holds."""
    checks = []
    if {"individual", "zeroshot"} <= set(table.index):
        ind, zs = table.loc["individual", tasks], table.loc["zeroshot", tasks]
        checks.append((f"individual average {ind.mean():.1f}% >= 90%", ind.mean() >= 90))
        checks.append((f"lowest individual task {ind.min():.1f}% ({ind.idxmin()}) >= 80%", ind.min() >= 80))
        checks.append((f"individual - zero-shot = {ind.mean() - zs.mean():.1f} points >= 25", ind.mean() - zs.mean() >= 25))
        above = sum(zs[t] > chance[t] for t in tasks)
        checks.append((f"zero-shot above chance on {above}/{len(tasks)} tasks", above > len(tasks) / 2))
        for m in ["weight_averaging", "task_arithmetic"]:
            if m in table.index:
                v = table.loc[m, tasks].mean()
                checks.append((f"{m} {v:.1f}% is >= 10 points below individual and >= 10 above zero-shot",
                               ind.mean() - v >= 10 and v - zs.mean() >= 10))
    return checks


def _html_table(df: pd.DataFrame, caption: str, bold_max: bool = False) -> str:
    """A booktabs-style table; with ``bold_max`` the best merge per column is bold."""
    cols = list(df.columns)
    best = df.drop(index=[i for i in df.index if i in REFERENCES]).max(axis=0) if bold_max else None
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [df.index.name or ""] + cols)
    body = []
    for idx, row in df.iterrows():
        cells = [f"<td>{html.escape(str(idx))}</td>"]
        for c in cols:
            v = row[c]
            text = f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))
            is_best = bold_max and idx not in REFERENCES and isinstance(v, float) and v == best[c]
            cls = ' class="best"' if is_best else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def write_report(eval_files: list[str], config: dict, benchmarks: list[str], zoo: dict,
                 markdown: Path, html_path: Path, table_path: Path) -> None:
    """Write the markdown and HTML report and the accuracy table (parquet)."""
    evals = pd.concat([pd.read_parquet(f) for f in eval_files], ignore_index=True)
    tasks, heldout = list(zoo["tasks"]), list(zoo.get("heldout_tasks", []))
    negation = evals["model"].str.startswith("task_negation_")
    main = accuracy_table(evals[~negation], tasks)
    main.index.name = "method"
    main.reset_index().to_parquet(table_path, index=False)
    chance = {t: 100.0 / n for t, n in _class_counts(zoo, tasks + heldout).items()}
    checks = zoo_checks(main, tasks, chance)
    timings = stage_timings(benchmarks).set_index("stage")
    config_text = yaml.safe_dump(config, sort_keys=False)
    versions = {p: _version(p) for p in PACKAGES}
    sections_md = [f"# Adaptive model merging report: zoo `{zoo['name']}`", "",
                   f"Architecture `{zoo['arch']}`, {len(tasks)} tasks merged, seed {zoo.get('seed', 0)}.", "",
                   "## Accuracy (%) on the test splits", "", main.round(1).to_markdown(), ""]
    sections_html = [f"<h1>Adaptive model merging report: zoo <code>{html.escape(zoo['name'])}</code></h1>",
                     f"<p>Architecture <code>{html.escape(zoo['arch'])}</code>, {len(tasks)} tasks merged, "
                     f"seed {zoo.get('seed', 0)}.</p>",
                     _html_table(main, "Table 1. Top-1 accuracy (%) on each task's test split.", bold_max=True)]
    if heldout:
        held = accuracy_table(evals, heldout)
        held.index.name = "model"
        sections_md += ["## Held-out tasks (not merged)", "", held.round(1).to_markdown(), ""]
        sections_html.append(_html_table(held, "Table 2. Held-out tasks, kept for the unseen-task experiment."))
    if negation.any():
        neg = accuracy_table(evals[negation], tasks)
        neg.index = [m.removeprefix("task_negation_") for m in neg.index]
        neg.index.name = "negated task"
        sections_md += ["## Task negation", "", neg.round(1).to_markdown(), ""]
        sections_html.append(_html_table(neg, "Table 3. Task negation: accuracy (%) after subtracting one "
                                               "task's vector (rows); the negated task should drop."))
    if checks:
        sections_md += ["## Zoo quality", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks] + [""]
        items = "".join(f"<li class=\"{'ok' if ok else 'fail'}\">{'&#10003;' if ok else '&#10007;'} "
                         f"{html.escape(text)}</li>" for text, ok in checks)
        sections_html.append(f"<h2>Zoo quality</h2><ul>{items}</ul>")
    sections_md += ["## Stage timings", "", timings.round(1).to_markdown() if len(timings) else "(none)", ""]
    sections_html.append("<h2>Stage timings</h2>" + (_html_table(timings, "Wall time (s, summed over jobs) and peak "
                                                                 "memory (MB) per stage, from Snakemake's benchmark files.")
                                                     if len(timings) else "<p>(none)</p>"))
    env = f"Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
    sections_md += ["## Software", "", env, "", "## Configuration", "", "```yaml", config_text.strip(), "```", ""]
    sections_html += [f"<h2>Software</h2><p>{html.escape(env)}</p>",
                      f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>"]
    markdown.write_text("\n".join(sections_md))
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>AdaMerging report: "
                         f"{html.escape(zoo['name'])}</title><style>{CSS}</style></head><body>"
                         + "\n".join(sections_html) + "</body></html>")


def _class_counts(zoo: dict, tasks: list[str]) -> dict[str, int]:
    from pipeline.cli import task_prompts

    return {t: len(task_prompts(zoo, t)[0]) for t in tasks}


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as such
        return "not installed"

