"""The presets (config/presets/*.yaml): overlays of any shipped config that the workflow accepts,
and the fixed lambda of the `paper` preset, which moves Task Arithmetic and TIES from the
lambda search to merge_task_vectors (a dry run)."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers.config import load, refusal
from helpers.workflow import REPO, snakemake
from snakemake.utils import update_config

from pipeline.merging import registry

PRESETS = sorted(p.name for p in (REPO / "config/presets").glob("*.yaml"))
CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml"))


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "config/presets" / name).read_text())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("base", CONFIGS)
def test_every_preset_overlays_every_shipped_config(base, name):
    cfg = load(base)
    update_config(cfg, preset(name))  # what Snakemake does with a second --configfile
    assert refusal(cfg) is None


def test_the_paper_preset_is_the_official_scripts_settings():
    merging = preset("paper.yaml")["merging"]
    assert merging["lambda_choice"] == "fixed"
    assert merging["task_arithmetic"] == {"lam": 0.3}
    assert merging["ties_merging"] == {"k": 20, "merge": "sum", "lam": 0.3, "count_over": "official_encoder"}
    assert merging["adamerging"]["ties_count_over"] == "official_encoder"


def merge_commands(work: Path, *configs: str, **sections) -> dict[str, list[str]]:
    """rule -> the command lines of its jobs in a dry run of micro.yaml with ``configs`` laid
    over it (and ``sections`` of config added)."""
    cfg = load("micro.yaml")
    cfg.update(sections)
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "-p", "--configfile", "run.yaml", *configs, cwd=work)
    out = proc.stdout + proc.stderr
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        command = re.search(r"^Shell command: (.*)$", block, re.MULTILINE)
        if rule and command:
            jobs.setdefault(rule[1], []).append(command[1])
    return jobs


def method_settings(commands: list[str]) -> dict[str, dict]:
    """--method -> --settings of the merge command lines."""
    out = {}
    for line in commands:
        args = shlex.split(line.split("adamerge merge ", 1)[1].split(" > ")[0])
        out[args[args.index("--method") + 1]] = json.loads(args[args.index("--settings") + 1])
    return out


def test_a_fixed_lambda_merges_task_arithmetic_and_ties_like_the_other_store_methods(tmp_path):
    searched = registry.names(searched=True)  # Task Arithmetic, TIES, DARE, consensus TA and TIES
    default = merge_commands(tmp_path)
    assert set(method_settings(default["merge_task_vectors"])) == set(registry.names(registry.STORE, searched=False))
    assert len(default["lambda_search"]) == len(searched)
    fixed = merge_commands(tmp_path, "config/presets/paper.yaml")
    settings = method_settings(fixed["merge_task_vectors"])
    assert settings["task_arithmetic"] == {"lam": 0.3}
    assert settings["ties_merging"] == {"k": 20, "merge": "sum", "lam": 0.3, "count_over": "official_encoder"}
    # the search still runs for the sensitivity analysis' validation curves (the paper's two
    # methods by default: analysis.sensitivity.methods), its model kept apart
    assert len(fixed["lambda_search"]) == 2
    assert all("results/micro/lambda_search/" in c and "/merges/" not in c for c in fixed["lambda_search"])
    no_curve = merge_commands(tmp_path, "config/presets/paper.yaml", analysis={"sensitivity": {"enabled": False}})
    assert "lambda_search" not in no_curve


@pytest.fixture(autouse=True)
def _presets_in_work(tmp_path):
    (tmp_path / "config/presets").mkdir(parents=True)
    for name in PRESETS:
        (tmp_path / "config/presets" / name).write_text((REPO / "config/presets" / name).read_text())
