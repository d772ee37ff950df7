"""Config validation: bad keys or values fail before any job runs, naming the key."""

from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from workflow_helpers import REPO, snakemake

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "micro.yaml", "vit_b32.yaml"])
def test_shipped_configs_validate(name):
    cfg = load(name)
    validate(cfg, SCHEMA)
    assert cfg["zoo"]["trust_pickles"] is False


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["zoo"].update(taskz=["x"]), "taskz"),
        (lambda c: c["zoo"]["synthetic"]["finetune"].update(lr=-1), "lr"),
        (lambda c: c["zoo"].update(source="hub"), "hub"),
        (lambda c: c["zoo"].pop("synthetic"), "synthetic"),
        (lambda c: c["zoo"].update(tasks=[]), "tasks"),
    ],
)
def test_bad_config_names_the_key(mutate, needle):
    cfg = load("micro.yaml")
    mutate(cfg)
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert needle in str(err.value)


def test_bad_config_fails_the_dry_run_before_any_job(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["zoo"]["synthetic"]["pretrain"]["stepz"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr + proc.stdout
    assert not (tmp_path / "resources").exists()


def test_heldout_task_overlap_is_refused(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["zoo"]["heldout_tasks"] = [cfg["zoo"]["tasks"][0]]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "heldout_tasks" in proc.stderr + proc.stdout
