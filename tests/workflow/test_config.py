"""Config validation: bad keys or values fail before any job runs, naming the key."""

from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, snakemake
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

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


def test_schema_lists_match_their_one_source():
    """The schema's enums of AdaMerging variants and corruptions are the registry's and the
    corruption module's (JSON Schema cannot import them; this keeps the copies equal)."""
    from pipeline.analysis.corruptions import CORRUPTIONS
    from pipeline.merging import registry

    analysis = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["analysis"]["properties"]
    variants = [registry.adamerging_variant(m) for m in registry.names(registry.MODELS_AND_TEST)]
    assert analysis["robustness"]["properties"]["variant"]["enum"] == variants
    assert analysis["unseen"]["properties"]["variants"]["items"]["enum"] == variants
    assert analysis["unseen"]["properties"]["variants"]["default"] == variants
    assert analysis["robustness"]["properties"]["corruptions"]["items"]["enum"] == list(CORRUPTIONS)
    assert analysis["robustness"]["properties"]["corruptions"]["default"] == list(CORRUPTIONS)


def test_schema_defaults_are_the_settings_defaults():
    """Every default of a method's config section equals its settings dataclass default."""
    import dataclasses

    from pipeline.merging import registry

    merging = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["merging"]["properties"]
    job_keys = {"enabled", "max_images", "gpus"}  # workflow settings, not the method's
    for name, section in merging.items():
        spec = registry.METHODS.get("adamerging_layer_wise" if name == "adamerging" else name)
        if spec is None or "properties" not in section:
            continue
        fields = {f.name: f.default for f in dataclasses.fields(spec.settings)}
        for key, prop in section["properties"].items():
            if key in job_keys:
                continue
            assert key in fields, f"merging.{name}.{key} is not a setting of {spec.name}"
            default = prop["default"]
            assert (tuple(default) if isinstance(default, list) else default) == fields[key], f"merging.{name}.{key}"
