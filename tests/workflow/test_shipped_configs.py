"""Every shipped config (and each suite of the Hub configs) builds its whole DAG: a dry run
fails on any parse-time error of the rules, not only on schema errors."""

import re
from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, snakemake

CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml"))
HUB_CONFIGS = [n for n in CONFIGS if "repo" in str(yaml.safe_load((REPO / "config" / n).read_text())["zoo"])]
SUITES = {"TA8": 8, "TALL14": 14, "TALL20": 20}


def placeholder_checkpoints(cfg: dict, work: Path) -> None:
    """Empty files where a config expects local checkpoints (a dry run reads none)."""
    zoo = cfg["zoo"]
    pattern = zoo.get("checkpoints")
    if isinstance(pattern, str):
        from pipeline.data import suites

        tasks = zoo.get("tasks") or [t.name for t in suites.suite(zoo["suite"])]
        for task in tasks + zoo.get("heldout_tasks", []):
            path = work / pattern.format(task=task, hub_name=suites.task(task).hub_name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def dry_run(cfg: dict, work: Path, *args: str) -> str:
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", *args, "--configfile", "run.yaml", cwd=work, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def jobs(log: str) -> dict[str, int]:
    """rule -> job count of the dry run's job table."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", log, re.M) if m[1] != "total"}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_dry_runs(name, tmp_path):
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    placeholder_checkpoints(cfg, tmp_path)
    counts = jobs(dry_run(cfg, tmp_path, "--quiet", "rules"))
    assert counts.get("report") == 1, counts
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_plan_a_download_per_repo_of_each_suite(name, suite, tmp_path):
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg["zoo"]["suite"] = suite
    counts = jobs(dry_run(cfg, tmp_path, "--quiet", "rules"))
    n = SUITES[suite]
    assert counts["download_pretrained"] == 1
    assert counts["download_finetuned"] == counts["import_finetuned"] == n
    assert counts["download_dataset"] == n
    assert counts["decode_images"] == 3 * n  # test for every model, val for the lambda search, train for Fisher/RegMean


def test_local_checkpoints_per_task_are_the_imports_inputs(tmp_path):
    """``checkpoints: {paths: ...}`` gives each task its own file or Hugging Face folder; the
    import's inputs are that file or every file of that folder, so a replaced checkpoint
    reruns its import. A task without a path is refused naming it."""
    cfg = yaml.safe_load((REPO / "config/vit_b32.yaml").read_text())
    tasks = cfg["zoo"]["tasks"] = ["EuroSAT", "DTD"]
    (tmp_path / "eurosat.bin").touch()
    hf_dir = tmp_path / "dtd_hf"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).touch()
    cfg["zoo"]["checkpoints"] = {"paths": {"EuroSAT": "eurosat.bin", "DTD": "dtd_hf"}}
    log = dry_run(cfg, tmp_path)
    imports = re.findall(r"^rule import_finetuned:\n((?:    .*\n)+)", log, re.M)
    assert len(imports) == len(tasks)
    inputs = {line.split(":", 1)[1].strip() for block in imports for line in block.splitlines()
              if line.strip().startswith("input:")}
    assert any("eurosat.bin" in i for i in inputs)
    assert any("dtd_hf/config.json" in i and "dtd_hf/model.safetensors" in i for i in inputs)

    del cfg["zoo"]["checkpoints"]["paths"]["DTD"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "run.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "zoo.checkpoints.paths has no entry for task 'DTD'" in proc.stdout + proc.stderr


def test_suite_tasks_without_a_data_root_reader_are_refused_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config/vit_b32.yaml").read_text())
    cfg["zoo"]["tasks"] = ["EuroSAT", "Flowers102"]
    placeholder_checkpoints(cfg, tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "run.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "['Flowers102'] have no reader for zoo.data_root" in proc.stdout + proc.stderr
