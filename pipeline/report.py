"""The report: accuracy table (rows models, columns tasks + average), the analyses (tables
and figures), config, software versions, stage timings; written as markdown (figures as
relative links) and as one self-contained HTML page (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import yaml

from pipeline.analysis import claims
from pipeline.job_usage import logged_usage
from pipeline.merging import registry

MODEL_ORDER = ["zeroshot", "individual", *registry.table_rows()]
REFERENCES = {"zeroshot", "individual", "multitask"}  # not merges: no bold for them
PACKAGES = ["torch", "open_clip_torch", "snakemake", "zarr", "pyarrow", "triton", "numpy", "pandas", "scipy",
            "matplotlib"]

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
h3{font-size:1.05em;margin-top:1.4em}
figure{margin:1.2em 0;text-align:center}
figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;text-align:left;margin-top:.4em}
figcaption b,caption b{font-style:normal}
p.note{font-size:.92em;color:#444}
.ok{color:#17691d}.fail{color:#a11}.missing{color:#777}
table.claims th,table.claims td{text-align:left}table.claims td:last-child{white-space:nowrap}
"""


def accuracy_table(evals: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Rows models, columns ``tasks`` + Avg. (accuracy %); models missing a task get NaN."""
    sub = evals[evals["task"].isin(tasks)]
    table = sub.pivot_table(index="model", columns="task", values="accuracy", aggfunc="first")
    table = table.reindex(columns=tasks)
    table["Avg."] = table[tasks].mean(axis=1)
    order = [m for m in MODEL_ORDER if m in table.index] + sorted(set(table.index) - set(MODEL_ORDER))
    return table.loc[order]


def stage_timings(benchmarks: list[str], log_dir: Path | None = None) -> pd.DataFrame:
    """Wall time and peak memory per stage from Snakemake's benchmark files; the peak memory
    from each job's own usage line (:func:`pipeline.job_usage.logged_usage`) where its log under ``log_dir``
    (``{log_dir}/{stage}/{job}.log`` beside ``{stage}/{job}.tsv``) has one: exact where the
    benchmark samples every 30 s, and the job's own where it ran in the job server."""
    rows = []
    for path in benchmarks:
        b = pd.read_csv(path, sep="\t")
        stage, job = Path(path).parent.name, Path(path).stem
        usage = logged_usage(log_dir / stage / f"{job}.log") if log_dir is not None else None
        rss = usage["rss_mb"] if usage else float(b["max_rss"].iloc[0]) if "max_rss" in b else float("nan")
        rows.append({"stage": stage, "job": job, "seconds": float(b["s"].iloc[0]), "max_rss_mb": rss})
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


def fisher_note(methods: list[str], config: dict) -> str | None:
    """Which Fisher estimator made the Fisher Merging row (None without that row)."""
    from pipeline.merging.fisher_merging import ESTIMATORS, Settings

    if "fisher_merging" not in methods:
        return None
    settings = {**dataclasses.asdict(Settings()), **config.get("merging", {}).get("fisher_merging", {})}
    return (f"Fisher Merging: {ESTIMATORS[settings['estimator']]}, on {settings['examples']} training examples per "
            f"task (merging.fisher_merging.estimator: {settings['estimator']}).")


def _html_table(df: pd.DataFrame, caption: str, bold_max: bool = False, fmt: str = "{:.1f}") -> str:
    """A booktabs-style table; with ``bold_max`` the best merge per column is bold."""
    cols = list(df.columns)
    best = df.drop(index=[i for i in df.index if i in REFERENCES]).max(axis=0) if bold_max else None
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [df.index.name or ""] + cols)
    body = []
    for idx, row in df.iterrows():
        cells = [f"<td>{html.escape(str(idx))}</td>"]
        for c in cols:
            v = row[c]
            text = ("-" if pd.isna(v) else fmt.format(v)) if isinstance(v, float) else html.escape(str(v))
            is_best = bold_max and idx not in REFERENCES and isinstance(v, float) and v == best[c]
            cls = ' class="best"' if is_best else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


ADAMERGING_RUN = ("steps", "batches_per_task", "batch_size", "images")


@dataclass
class Runs:
    """What the report's rows ran with, so that a row of an analysis says where it differs
    from the main table's row of the same method: ``tables`` (from the workflow) maps "main"
    and each analysis (robustness, unseen, pem) to AdaMerging's steps, batches_per_task,
    batch_size and test images per task (0: all), with the analysis' ``lam`` of Task
    Arithmetic and TIES and robustness' ``variant``; ``merges`` maps each main-table merge to
    its record (model.json: settings, and for a lambda searched on validation its grid)."""

    tables: Mapping[str, Mapping] = field(default_factory=dict)
    merges: Mapping[str, Mapping] = field(default_factory=dict)

    @classmethod
    def read(cls, tables: Mapping[str, Mapping] | None, records: list[str]) -> Runs:
        merges = {}
        for path in records:
            record = json.loads(Path(path).read_text())
            merges[record["method"]] = record
        return cls(tables or {}, merges)

    def adamerging(self, table: str) -> str:
        """AdaMerging's run in ``table``: "500 steps of 2 x 16 images, from all test images"."""
        run = self.tables.get(table, {})
        if not all(k in run for k in ADAMERGING_RUN):
            return ""
        images = "all test images" if run["images"] == 0 else f"{run['images']} test images per task"
        return f"{run['steps']} steps of {run['batches_per_task']} x {run['batch_size']} images, from {images}"

    def lam(self, method: str, table: str = "main") -> float | None:
        if table != "main":
            return self.tables.get(table, {}).get("lam")
        return self.merges.get(method, {}).get("settings", {}).get("lam")

    def row(self, method: str, table: str) -> str:
        """The display name of ``method``'s row in ``table``, with what it ran with where that
        differs from the main table's row of the method."""
        name = "AdaMerging" if method == "adamerging" else _label(method)
        if method.startswith("adamerging"):
            ran, main = self.adamerging(table), self.adamerging("main")
            return f"{name} ({ran})" if ran and ran != main else name
        lam, main = self.lam(method, table), self.lam(method)
        return f"{name} (lambda {lam:g})" if lam is not None and lam != main else name

    def main_note(self, methods: list[str]) -> str:
        """What the main table's merges ran with (their records and AdaMerging's run)."""
        parts = []
        for method in methods:
            record = self.merges.get(method)
            if not record or not record.get("settings"):
                continue
            settings = ", ".join(f"{k} {v}" for k, v in sorted(record["settings"].items()))
            searched = " (lambda chosen on the validation split)" if "lambda_grid" in record else ""
            parts.append(f"{_label(method)}: {settings}{searched}")
        if any(m.startswith("adamerging") for m in methods) and self.adamerging("main"):
            parts.append(f"AdaMerging: {self.adamerging('main')}")
        return ("Settings of the rows: " + "; ".join(parts) + ".") if parts else ""


def _claims_html(table: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("Claim", "Paper", "Here", "Verdict"))
    css = {claims.HOLDS: "ok", claims.FAILS: "fail", claims.MISSING: "missing"}
    body = "".join(
        f"<tr><td>{html.escape(r.claim)}</td><td>{html.escape(r.paper)}</td><td>{html.escape(r.here)}</td>"
        f"<td class='{css[r.verdict]}'>{html.escape(r.verdict)}</td></tr>" for r in table.itertuples())
    return (f"<table class='claims'><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


CLAIM_TABLES = ("unseen", "robustness", "spearman", "sensitivity", "coefficients")


def paper_claims(main: pd.DataFrame, files: Mapping[str, str]) -> pd.DataFrame:
    """The paper's claims against the main table's averages and the analysis outputs in ``files``."""
    tables = {name: pd.read_parquet(files[name]) for name in CLAIM_TABLES if name in files}
    return claims.claims_table(main["Avg."].dropna().to_dict(), tables)


def write_report(eval_files: list[str], config: dict, benchmarks: list[str], zoo: dict,
                 markdown: Path, html_path: Path, table_path: Path, analysis: dict[str, str] | None = None,
                 merges: list[str] = (), runs: Mapping[str, Mapping] | None = None,
                 log_dir: Path | None = None) -> None:
    """Write the markdown and HTML report and the accuracy table (parquet); ``analysis``
    maps the names of :func:`analysis_sections` to the analysis outputs, ``merges`` lists the
    main table's merge records (model.json) and ``runs`` what each table's rows ran with
    (:class:`Runs`)."""
    row_runs = Runs.read(runs, list(merges))
    evals = pd.concat([pd.read_parquet(f) for f in eval_files], ignore_index=True)
    tasks, heldout = list(zoo["tasks"]), list(zoo.get("heldout_tasks", []))
    negation = evals["model"].str.startswith("task_negation_")
    main = accuracy_table(evals[~negation], tasks)
    main.index.name = "method"
    main.reset_index().to_parquet(table_path, index=False)
    chance = {t: 100.0 / n for t, n in _class_counts(zoo, tasks + heldout).items()}
    checks = zoo_checks(main, tasks, chance)
    timings = stage_timings(benchmarks, log_dir).set_index("stage")
    config_text = yaml.safe_dump(config, sort_keys=False)
    versions = {p: _version(p) for p in PACKAGES}
    paper = paper_claims(main, analysis or {})
    claims_note = (f"{claims.summary(paper)}: the claims of {registry.ADAMERGING} (its numbers for ViT-B/32 on 8 "
                   "tasks), each computed from this run's outputs.")
    if fails := claims.failing(paper):
        claims_note += f" Not reproduced in this run: {'; '.join(fails)}."
        if zoo.get("source") == "synthetic":
            claims_note += (" The synthetic zoo is a smoke test, not the paper's data: docs/synthetic-zoo.md lists "
                            "the zoo variants tried to make more of these claims hold, with their counts.")
    settings_note = row_runs.main_note(list(main.index))
    sections_md = [f"# Adaptive model merging report: zoo `{zoo['name']}`", "",
                   f"Architecture `{zoo['arch']}`, {len(tasks)} tasks merged, seed {zoo.get('seed', 0)}.", "",
                   "## Claims of the paper", "", claims_note, "", paper.to_markdown(index=False), "",
                   "## Accuracy (%) on the test splits", "", main.round(1).to_markdown(), "",
                   *([settings_note, ""] if settings_note else [])]
    sections_html = [f"<h1>Adaptive model merging report: zoo <code>{html.escape(zoo['name'])}</code></h1>",
                     f"<p>Architecture <code>{html.escape(zoo['arch'])}</code>, {len(tasks)} tasks merged, "
                     f"seed {zoo.get('seed', 0)}.</p>",
                     "<h2>Claims of the paper</h2>", f"<p class='note'>{html.escape(claims_note)}</p>",
                     _claims_html(paper, "The paper's claims: its numbers, this run's, and whether each holds."),
                     _html_table(main, "Table 1. Top-1 accuracy (%) on each task's test split.", bold_max=True),
                     *([f"<p class='note'>{html.escape(settings_note)}</p>"] if settings_note else [])]
    if note := fisher_note(list(main.index), config):
        sections_md += [note, ""]
        sections_html.append(f"<p class='note'>{html.escape(note)}</p>")
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
    if analysis:
        md, htm = analysis_sections(analysis, markdown.parent, row_runs, main)
        sections_md += md
        sections_html += htm
    sections_md += ["## Stage timings", "", timings.round(1).to_markdown() if len(timings) else "(none)", ""]
    timings_caption = ("Wall time (s, summed over jobs) from Snakemake's benchmark files and peak memory (MB) per "
                       "stage from each job's own usage line (else the benchmark's value, sampled every 30 s).")
    sections_html.append("<h2>Stage timings</h2>" + (_html_table(timings, timings_caption) if len(timings)
                                                     else "<p>(none)</p>"))
    env = f"Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
    sections_md += ["## Software", "", env, "", "## Configuration", "", "```yaml", config_text.strip(), "```", ""]
    sections_html += [f"<h2>Software</h2><p>{html.escape(env)}</p>",
                      f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>"]
    markdown.write_text("\n".join(sections_md))
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>AdaMerging report: "
                         f"{html.escape(zoo['name'])}</title><style>{CSS}</style></head><body>"
                         + "\n".join(sections_html) + "</body></html>")


def _class_counts(zoo: dict, tasks: list[str]) -> dict[str, int]:
    from pipeline.data.tasks import task_prompts

    return {t: len(task_prompts(zoo, t)[0]) for t in tasks}


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as such
        return "not installed"



class _Doc:
    """Markdown and HTML of the analysis sections, with running table and figure numbers."""

    def __init__(self, md_dir: Path, first_table: int = 4):
        self.md_dir, self.md, self.html = md_dir, [], []
        self.tables, self.figures = first_table - 1, 0

    def heading(self, text: str, level: int = 2) -> None:
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p class='note'>{html.escape(text)}</p>")

    def table(self, df: pd.DataFrame, caption: str, fmt: str = "{:.1f}", bold_max: bool = False) -> None:
        self.tables += 1
        floatfmt = fmt.strip("{}:")
        self.md += [f"*Table {self.tables}. {caption}*", "", df.to_markdown(floatfmt=floatfmt), ""]
        self.html.append(_html_table(df, f"Table {self.tables}. {caption}", bold_max=bold_max, fmt=fmt))

    def figure(self, path: str | None, caption: str) -> None:
        if not path or not Path(path).exists():
            return
        self.figures += 1
        rel = os.path.relpath(path, self.md_dir)
        self.md += [f"![Figure {self.figures}]({rel})", "", f"*Figure {self.figures}. {caption}*", ""]
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.html.append(f"<figure><img alt='Figure {self.figures}' src='data:image/png;base64,{data}'>"
                         f"<figcaption><b>Figure {self.figures}.</b> {html.escape(caption)}</figcaption></figure>")


def _label(name: str) -> str:
    from pipeline.analysis.common import label

    return label(name)


def analysis_sections(files: dict[str, str], md_dir: Path, runs: Runs | None = None,
                      main: pd.DataFrame | None = None) -> tuple[list[str], list[str]]:
    """Markdown and HTML of every analysis whose outputs are in ``files`` (names as in
    workflow/rules/analysis.smk: sensitivity, coefficients, distances, spearman, robustness,
    unseen, pem, each with a ``*_png`` figure); a row of a method ran otherwise than the main
    table's row of it says how (``runs``)."""
    runs = runs or Runs()
    doc = _Doc(md_dir)
    doc.heading("Appendix: analyses")
    if "sensitivity" in files:
        doc.heading("A. Sensitivity to the scaling coefficient lambda", 3)
        t = pd.read_parquet(files["sensitivity"])
        curves = t[t["kind"] == "curve"]
        wide = curves.pivot_table(index=["method", "split"], columns="lambda", values="accuracy")
        wide.index = [f"{_label(m)} ({s})" for m, s in wide.index]
        wide.columns = [f"{c:g}" for c in wide.columns]
        wide.index.name = "method (split)"
        doc.figure(files.get("sensitivity_png"), "Average accuracy (%) of Task Arithmetic and TIES-Merging against "
                   "lambda on the validation and test splits; AdaMerging and traditional MTL (test) as lines.")
        doc.table(wide, "Average accuracy (%) over the tasks at each lambda of the grid.")
        refs = t[t["kind"] == "reference"].set_index("method")["accuracy"]
        if len(refs):
            doc.para("Reference lines (test, average accuracy %): "
                     + "; ".join(f"{_label(m)} {v:.1f}" for m, v in refs.items()) + ".")
    if "coefficients" in files:
        doc.heading("B. Learned merging coefficients", 3)
        t = pd.read_parquet(files["coefficients"])
        task_wise = t[t["group"] == "all"]
        if len(task_wise):
            tw = task_wise.pivot_table(index="variant", columns="task", values="value", sort=False)
            tw.index = [_label(f"adamerging_{v}") for v in tw.index]
            tw.index.name = "variant"
            doc.table(tw, "Task-wise AdaMerging coefficients lambda_k after adaptation.", fmt="{:.3f}")
        doc.figure(files.get("coefficients_task_png"), "Task-wise coefficients per task.")
        doc.figure(files.get("coefficients_layer_png"), "Layer-wise coefficients, averaged over the tensors of each "
                   "transformer block (stem: patch embedding, class token, positional embedding, pre-norm; head: "
                   "final norm and projection).")
        layer = t[t["group"] != "all"]
        for variant, part in layer.groupby("variant", sort=False):
            grid = part.pivot_table(index="group", columns="task", values="value", sort=False)
            grid = grid.loc[list(dict.fromkeys(part.sort_values("order", kind="stable")["group"]))]
            grid.index.name = "group"
            doc.table(grid, f"{_label('adamerging_' + variant)}: mean coefficient per block and task.", fmt="{:.3f}")
        doc.figure(files.get("entropy_png"), "AdaMerging's objective (summed batch-mean entropy) per step; faint: raw, "
                   "solid: moving average.")
    if "distances" in files:
        doc.heading("C. Distances between models and task vectors", 3)
        d = pd.read_parquet(files["distances"])
        to_pre = d[d["a"] == "pretrained"].set_index("b")["l2"].drop("pretrained", errors="ignore")
        to_pre.index = [_label(m) for m in to_pre.index]
        doc.table(to_pre.to_frame("L2 to pretrained").rename_axis("model"),
                  "L2 distance of each image encoder to the pretrained one.", fmt="{:.3f}")
        doc.figure(files.get("distances_png"), "Pairwise L2 distances between the pretrained, fine-tuned (FT) and "
                   "merged image encoders.")
        doc.figure(files.get("cosine_png"), "Cosine similarity between task vectors (colour scale clipped to the "
                   "largest off-diagonal magnitude).")
    if "spearman" in files:
        doc.heading("D. Entropy as a surrogate of the loss", 3)
        sp = pd.read_parquet(files["spearman"])
        wide = sp.pivot_table(index="task", columns="lambda", values="spearman", sort=False)
        wide.columns = [f"lambda={c:g}" for c in wide.columns]
        wide.index.name = "task"
        doc.para("Spearman rank correlation between the per-sample Shannon entropy of a Task Arithmetic merge's "
                 "prediction and its cross-entropy loss on the test split (row 'all': pooled over tasks). "
                 + "Coefficients at lambda=" + ", ".join(
                     f"{lam:g}: " + ", ".join(f"{r.task} {r.spearman:.3f}" for r in g.itertuples())
                     for lam, g in sp.groupby("lambda")) + ".")
        doc.table(wide, "Spearman correlation of entropy and loss per task and lambda.", fmt="{:.3f}")
        doc.figure(files.get("surrogate_png"), "Cross-entropy loss against entropy per test sample "
                   "(a subsample of points; rho: Spearman over all samples).")
    if "robustness" in files:
        doc.heading("E. Robustness to corrupted test distributions", 3)
        r = pd.read_parquet(files["robustness"])
        sev = sorted(set(r.loc[r["severity"] > 0, "severity"]))
        doc.para(f"A merge of {r['task'].nunique()} tasks; AdaMerging (the variant its rows name) learns its "
                 f"coefficients on each corrupted test set's unlabeled images (severity "
                 f"{', '.join(map(str, sev)) or '-'}); "
                 "Task Arithmetic and TIES use the paper's lambda. Accuracy (%) on the corrupted test sets, "
                 "and on the clean test set for the coefficients adapted to each corruption.")
        tasks = list(dict.fromkeys(r["task"]))
        for corruption, part in r.groupby("corruption", sort=False):
            for test_set in (("clean",) if corruption == "clean" else ("corrupted", "clean")):
                sub = part[part["test_set"] == test_set]
                wide = sub.pivot_table(index="method", columns="task", values="accuracy", sort=False).reindex(
                    columns=tasks)
                wide["Avg."] = wide.mean(axis=1)
                wide.index = [runs.row(_robust_method(m, runs), "robustness") for m in wide.index]
                wide.index.name = "method"
                name = corruption.replace("_", " ")
                what = ("clean test set" if corruption == "clean" else
                        f"{name} test set" if test_set == "corrupted" else f"clean test set, adapted on {name}")
                doc.table(wide, f"Robustness: {what}.", bold_max=True)
        doc.figure(files.get("robustness_png"), "Average accuracy (%) per corruption (corrupted test sets; 'clean': "
                   "the clean test set).")
    if "unseen" in files:
        doc.heading("F. Generalisation to unseen tasks", 3)
        from pipeline.analysis.unseen import unseen_table

        rows = pd.read_parquet(files["unseen"])
        wide = unseen_table(rows)
        wide.index = [runs.row(m, "unseen") for m in wide.index]
        wide.index.name = "method"
        seen = list(dict.fromkeys(rows.loc[rows["group"] == "seen", "task"]))
        unseen = list(dict.fromkeys(rows.loc[rows["group"] == "unseen", "task"]))
        doc.para(f"Merged on the seen tasks ({', '.join(seen)}), evaluated on them and on the unseen tasks "
                 f"({', '.join(unseen)}), as the paper's Table 4. As in the paper, AdaMerging adapts its coefficients "
                 "(of the seen tasks' vectors) with the unlabeled test images of all tasks, the unseen ones included.")
        doc.table(wide, "Accuracy (%) on seen and unseen tasks.", bold_max=True)
        doc.figure(files.get("unseen_png"), "Average accuracy (%) on the seen and the unseen tasks.")
    if "pem" in files:
        doc.heading("G. Composition of parameter-efficient modules", 3)
        from pipeline.analysis.pem import METHODS as pem_methods
        from pipeline.analysis.pem import summary

        rows = pd.read_parquet(files["pem"])
        lora_lam = rows.loc[(rows["update"] == "lora") & (rows["method"] == "addition"), "lam"]
        full_lam = rows.loc[(rows["update"] == "full") & (rows["method"] == "addition"), "lam"]
        doc.para("LoRA adapters (rank-r updates of every attention and MLP matrix) fine-tuned per task, turned "
                 "into task vectors and composed like the full fine-tuning task vectors: alone, by addition "
                 f"(Task Arithmetic, lambda chosen on validation: full {full_lam.iloc[0] if len(full_lam) else '-'}, "
                 f"LoRA {lora_lam.iloc[0] if len(lora_lam) else '-'}), by negation (each task in turn; accuracy on "
                 "the negated task and on the others), and by task-wise AdaMerging over the updates.")
        composed = summary(rows)
        ran, main_run = runs.adamerging("pem"), runs.adamerging("main")
        composed.index = [f"{m} ({ran})" if m == pem_methods["adamerging"] and ran and ran != main_run else m
                          for m in composed.index]
        main_lam = runs.lam("task_arithmetic")
        if len(full_lam) and main_lam is not None:
            how = "run as the main table's" if ran == main_run else f"run for {ran} (main table: {main_run})"
            doc.para(f"The full fine-tuning column composes the main table's task vectors: its Addition is Task "
                     f"Arithmetic at lambda {full_lam.iloc[0]:g} (main table: {main_lam:g}) and its AdaMerging the "
                     f"task-wise variant, {how}.")
        doc.table(composed, "Average accuracy (%) of composed task updates.")
        doc.figure(files.get("pem_png"), "Composition of LoRA and full fine-tuning task updates.")
    if any(k.endswith("_summary") for k in files):
        test_time_section(doc, files, main)
    return doc.md, doc.html


def _robust_method(method: str, runs: Runs) -> str:
    """The robustness table's "adamerging" is the configured variant."""
    variant = runs.tables.get("robustness", {}).get("variant")
    return f"adamerging_{variant}" if method == "adamerging" and variant else method
def test_time_section(doc: _Doc, files: dict[str, str], main: pd.DataFrame | None) -> None:
    """Surgery and WEMoE: what each adds to the encoder, its average accuracy, Surgery's gain
    over its base merge, WEMoE's routing weights (table and figure)."""
    import json

    doc.heading("H. Test-time successors of AdaMerging", 3)
    rows = []
    for key in sorted(k for k in files if k.endswith("_summary")):
        summary = json.loads(Path(files[key]).read_text())
        method = summary["method"]
        avg = main.loc[method, "Avg."] if main is not None and method in main.index else float("nan")
        base = summary.get("base_method")
        base_avg = main.loc[base, "Avg."] if base and main is not None and base in main.index else float("nan")
        rows.append({"method": _label(method), "on top of": _label(base) if base else "Task Arithmetic",
                     "added parameters": f"{summary['added_parameters']:,}", "Avg.": avg,
                     "gain over its base": avg - base_avg if base else float("nan")})
    doc.para("Learned on the unlabeled test images like AdaMerging. Representation Surgery adds a rank-r module "
             "per task on the final features of its base merge (evaluated with each task's module); WEMoE routes "
             "each block's MLP per sample over the task vectors (the rest Task Arithmetic), so it stores the MLP "
             "task vectors of every task and a router per block.")
    doc.table(pd.DataFrame(rows).set_index("method"), "Test-time methods: parameters added to one encoder, average "
              "accuracy (%) and gain (points) over the base merge.")
    if "wemoe_routing" in files:
        from pipeline.analysis.routing import routing_summary

        doc.table(routing_summary(pd.read_parquet(files["wemoe_routing"])), "WEMoE: mean routing weight of each "
                  "task's own expert and of the other experts, over all routed blocks, for each task's test images.",
                  fmt="{:.3f}")
        doc.figure(files.get("wemoe_routing_png"), "WEMoE routing weights per routed block (rows) and expert "
                   "(columns) for each task's test images; the images' own task framed.")


def screenshot(html_path: Path, png: Path, width: int = 1200, height: int = 2400, timeout: float = 120) -> bool:
    """Render ``html_path`` with headless chromium into ``png``; False when no chromium is installed."""
    import shutil
    import subprocess

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        return False
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}",
                    Path(html_path).resolve().as_uri()], check=True, capture_output=True, timeout=timeout)
    return Path(png).exists()
