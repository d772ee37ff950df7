"""The micro workflow end to end: outputs, zoo quality, nothing-to-do reruns, incremental add-task."""

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.workflow import REPO, snakemake

from pipeline.merging import registry
from pipeline.merging.contract import Need

pytestmark = pytest.mark.workflow

ZOO = "micro"


def job_counts(dry_run_stdout: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table of a dry run."""
    table = dry_run_stdout.split("Job stats:")[1].split("Reasons:")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def test_every_output_exists(micro_run: Path):
    cfg = yaml.safe_load((micro_run / "config/micro.yaml").read_text())["zoo"]
    tasks = cfg["tasks"] + cfg["heldout_tasks"]
    models = micro_run / "resources/models" / ZOO
    for t in tasks:
        assert (models / "finetuned" / f"{t}.safetensors").stat().st_size > 0
        assert (models / "heads" / f"{t}.safetensors").exists()
        assert (micro_run / f"results/{ZOO}/eval/individual/{t}.parquet").exists()
    for name in ["report.html", "report.md", "accuracy_table.parquet"]:
        assert (micro_run / f"results/{ZOO}/report" / name).stat().st_size > 0
    html = (micro_run / f"results/{ZOO}/report/report.html").read_text()
    assert "<table>" in html and "individual" in html and "Stage timings" in html


def test_eval_rows_have_the_documented_schema(micro_run: Path):
    df = pd.read_parquet(micro_run / f"results/{ZOO}/eval/zeroshot.parquet")
    assert list(df.columns) == ["model", "method", "task", "split", "accuracy", "n", "seconds"]
    assert (df["n"] > 0).all() and df["accuracy"].between(0, 100).all()


def test_micro_zoo_quality(micro_run: Path):
    """Fine-tuning beats zero-shot clearly on the micro zoo and merges sit between them.

    The micro zoo trains for seconds, so its bounds are lower than the demo's (individual
    >= 90%): measured with seed 0, zero-shot 29%, individual 70%, merges 38-45%."""
    from pipeline.data.synthetic import ATTRIBUTES

    cfg = yaml.safe_load((micro_run / "config/micro.yaml").read_text())["zoo"]
    table = pd.read_parquet(micro_run / f"results/{ZOO}/report/accuracy_table.parquet").set_index("method")
    avg = table["Avg."]
    chance = sum(100 / len(ATTRIBUTES[t].classnames) for t in cfg["tasks"]) / len(cfg["tasks"])
    assert avg["individual"] >= 60
    assert avg["individual"] - avg["zeroshot"] >= 25
    assert avg["zeroshot"] > chance + 3
    for merged in ["weight_averaging", "task_arithmetic", "adamerging_layer_wise"]:
        assert avg["zeroshot"] < avg[merged] < avg["individual"]


def test_second_run_has_nothing_to_do(micro_run: Path):
    proc = snakemake("-n", "--cores", "2", "--configfile", "config/micro.yaml", cwd=micro_run)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def params_changed(summary: str) -> set[str]:
    """The rules of the outputs whose params changed, from ``snakemake --detailed-summary``
    (its status column judges each output on its own, not by what runs upstream)."""
    rows = [line.split("\t") for line in summary.splitlines() if line.count("\t") >= 7]
    return {row[2] for row in rows[1:] if row[6] == "params changed"}


def test_code_edits_rerun_exactly_the_jobs_that_import_them(micro_run: Path, tmp_path: Path):
    """The code version of a job covers every module it imports (pipeline/provenance.py):
    a comment added to a module reruns exactly the jobs whose code imports it."""
    clone = tmp_path / "clone"
    for name in ("workflow", "pipeline", "kernels"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Snakefile", clone / "Snakefile")

    def edited(module: str) -> set[str]:
        path = clone / module
        original = path.read_text()
        path.write_text(original + "\n# an edit that changes no behaviour\n")
        try:
            proc = snakemake("--detailed-summary", "--nolock", "--configfile", "config/micro.yaml", cwd=micro_run,
                             repo=clone)
        finally:
            path.write_text(original)
        return params_changed(proc.stdout)

    proc = snakemake("-n", "--nolock", "--cores", "2", "--configfile", "config/micro.yaml", cwd=micro_run, repo=clone)
    assert "Nothing to be done" in proc.stdout + proc.stderr  # the copy's code versions are the project's
    streaming_users = {  # merges that stream the store, everything that runs one of them, the routes' evaluation
        "merge_task_vectors", "lambda_search", "task_negation", "evaluate_merged", "analysis_sensitivity_test",
        "analysis_surrogate", "analysis_robustness_run", "analysis_robustness", "analysis_unseen_run", "analysis_unseen",
        "analysis_pem_lora", "analysis_pem", "report",
    }
    assert edited("pipeline/store/streaming.py") == streaming_users
    assert edited("pipeline/report.py") == {"report"}
    assert edited("pipeline/merging/regmean.py") == {"merge_with_data"}
    evaluation_users = edited("pipeline/evaluation.py")
    assert evaluation_users >= {"evaluate_zeroshot", "evaluate_merged", "lambda_search", "analysis_robustness_run"}
    assert not evaluation_users & {"merge_task_vectors", "merge_with_data", "task_negation", "adamerging"}
    assert "evaluate_merged" not in edited("pipeline/merging/ties_merging.py")


def test_adding_a_task_reruns_only_its_jobs_and_the_whole_set_jobs(micro_run: Path):
    cfg = yaml.safe_load((micro_run / "config/micro.yaml").read_text())
    cfg["zoo"]["tasks"].append("count")
    (micro_run / "config/added.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--cores", "2", "--configfile", "config/added.yaml", cwd=micro_run)
    # the registry's methods by rule (streamed once | lambda searched | fine-tuned models and data)
    streamed = len(registry.names(registry.STORE, searched=False))
    searched = len(registry.names(searched=True))
    with_data = len(registry.names(registry.MODELS_AND_TRAIN)) + len(registry.names(frozenset({Need.TRAIN_DATA})))
    n_methods = streamed + searched + with_data
    test_time = registry.test_time_methods()  # Surgery (on layer-wise AdaMerging) and WEMoE
    assert job_counts(proc.stdout) == {
        # the new task's own jobs
        "task_data": 1, "zero_shot_head": 1, "finetune": 1, "task_vector": 1, "task_negation": 1,
        "evaluate_individual": 1,
        # the jobs that consume the whole task set (the other tasks' negations are re-evaluated
        # because their evaluation covers every task)
        "evaluate_zeroshot": 1, "merge_task_vectors": streamed, "lambda_search": searched,
        "merge_with_data": with_data,
        "evaluate_merged": n_methods, "evaluate_negation": len(cfg["zoo"]["tasks"]),
        "adamerging": 4, "evaluate_adamerging": 4, **{m: 1 for m in test_time}, "evaluate_test_time": len(test_time),
        # analyses over the whole task set; the unseen-task split (the last two tasks) moves;
        # the robustness merge (the first four tasks) is unchanged
        "analysis_sensitivity_test": 2,  # Task Arithmetic and TIES: analysis.sensitivity.methods' default
        "analysis_sensitivity": 1, "analysis_coefficients": 1, "analysis_distances": 1,
        "analysis_surrogate": 1, "analysis_unseen": 1, "lora_finetune": 1, "analysis_pem_lora": 1, "analysis_pem": 1,
        "analysis_unseen_run": 1 + len(cfg["analysis"]["unseen"]["variants"]),  # baselines + AdaMerging
        "report": 1, "all": 1,
    }
    assert "wildcards: task=count" in proc.stdout


def test_added_task_runs_and_lands_in_the_results(micro_run: Path):
    """Run the added-task config for real (after the dry-run test above): only the expected
    jobs run, the old tasks' checkpoints stay untouched, and the merges include the new task."""
    added = micro_run / "config/added.yaml"
    if not added.exists():
        pytest.skip("needs test_adding_a_task_reruns_only_its_jobs_and_the_whole_set_jobs first")
    models = micro_run / "resources/models" / ZOO / "finetuned"
    before = {p.name: p.stat().st_mtime_ns for p in models.glob("*.safetensors")}
    snakemake("--cores", "2", "--configfile", "config/added.yaml", cwd=micro_run)
    after = {p.name: p.stat().st_mtime_ns for p in models.glob("*.safetensors")}
    assert {k: after[k] for k in before} == before  # no old task was fine-tuned again
    assert "count.safetensors" in after
    table = pd.read_parquet(micro_run / f"results/{ZOO}/report/accuracy_table.parquet").set_index("method")
    assert "count" in table.columns and table.loc["task_arithmetic", "count"] > 0
    assert "count" in pd.read_parquet(micro_run / f"results/{ZOO}/eval/adamerging_layer_wise.parquet")["task"].values
    proc = snakemake("-n", "--cores", "2", "--configfile", "config/added.yaml", cwd=micro_run)
    assert "Nothing to be done" in proc.stdout + proc.stderr
