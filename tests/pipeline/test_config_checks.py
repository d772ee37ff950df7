"""The config rules JSON Schema cannot say (pipeline/config_checks.py): each refuses what a
job would refuse or get wrong, naming the key and the fix; the shipped configs pass."""

import pytest
from helpers.config import SCHEMA, load, refusal, set_key
from helpers.workflow import REPO
from snakemake.utils import validate

from pipeline import config_checks


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_the_shipped_configs_have_no_problem(name):
    cfg = load(name)
    validate(cfg, SCHEMA)
    assert config_checks.problems(cfg) == []
    config_checks.check(cfg)


@pytest.mark.parametrize("key, value, needle", [
    # orders and sizes
    ("merging.lambda_grid", {"start": 1.0, "stop": 0.0}, "merging.lambda_grid: start 1.0 is above stop 0.0; give"),
    ("merging.lambda_grid", {"step": 1e-9}, "merging.lambda_grid.step: 1e-09 makes 1e+09 lambdas"),
    ("merging.lambda_grid", {"start": -1e30, "stop": 1e30}, "merging.lambda_grid.step"),
    ("merging.adamerging.clamp", [1, 0], "merging.adamerging.clamp: [1, 0] is not [low, high]; give low <= high"),
    ("analysis.pem.adamerging", {"clamp": [0.5, 0.2]}, "analysis.pem.adamerging.clamp: [0.5, 0.2]"),
    ("merging.adamerging.init", 1.5, "merging.adamerging.init: init 1.5 lies outside clamp [0.0, 1.0]"),
    ("analysis.unseen.adamerging", {"clamp": [0.5, 1.0]}, "analysis.unseen.adamerging.clamp: init 0.3 lies outside"),
    ("merging.storage", {"codec": "blosc", "level": 12}, "merging.storage.level: 12 is beyond blosc's levels"),
    ("merging.chunk_mib", 300, "merging.budget_mib: 1024 MiB holds no block"),
    ("zoo.synthetic.pretrain.batch_size", 20000, "zoo.synthetic.pretrain.batch_size: 20000 is more than the corpus"),
    # task references
    ("analysis.robustness.tasks", ["colour", "digit"], "analysis.robustness.tasks: ['digit'] are no tasks of the zoo"),
    ("analysis.unseen.tasks", ["colour", "background", "stripes", "quadrant"], "analysis.unseen.tasks: ["),
    ("zoo.heldout_tasks", ["colour"], "zoo.heldout_tasks: ['colour'] also appear in zoo.tasks"),
    # numbers the jobs cannot take
    ("merging.adamerging.steps", 100.0, "merging.adamerging.steps: 100.0 is no integer; write 100"),
    ("evaluation.batch_size", 512.0, "evaluation.batch_size: 512.0 is no integer"),
    ("merging.adamerging.batch_size", 1e20, "merging.adamerging.batch_size: 1e+20 is no integer; give an integer"),
    ("merging.adamerging.lr", float("nan"), "merging.adamerging.lr: nan is not a finite number"),
    ("merging.lambda_grid.stop", float("inf"), "merging.lambda_grid.stop: inf is not a finite number"),
    ("merging.fisher_merging.min_fisher", 1e300, "merging.fisher_merging.min_fisher: 1e+300 is beyond float32"),
    ("analysis.surrogate.lambdas", [0.1, -1e39], "analysis.surrogate.lambdas[1]: -1e+39 is beyond float32"),
    ("analysis.surrogate.max_samples", 10**30, f"analysis.surrogate.max_samples: {10**30} is beyond a 32-bit"),
])
def test_values_the_jobs_would_reject_are_refused_naming_the_key(key, value, needle):
    why = refusal(set_key(load("micro.yaml"), key, value))
    assert why is not None and needle in why, why


@pytest.mark.parametrize("key, value", [
    ("merging.lambda_grid", {"start": 0.5, "stop": 0.5}),  # one lambda
    ("merging.lambda_grid", {"start": -1.0, "stop": 0.998, "step": 0.002}),  # 1000 lambdas, the most
    ("merging.adamerging.clamp", [0.3, 0.3]),
    ("analysis.unseen.adamerging", {"init": 1.0}),
    ("merging.storage", {"codec": "zstd", "level": 22}),
    ("merging.chunk_mib", 128),  # 4 tasks: a 512 MiB block, half the budget
    ("analysis.unseen.tasks", ["quadrant", "border"]),  # a held-out task is unseen too
    ("analysis.robustness.tasks", ["border"]),
    ("merging.adamerging.lr", 1),  # an integer is a number
])
def test_values_the_jobs_take_pass(key, value):
    assert refusal(set_key(load("micro.yaml"), key, value)) is None


@pytest.mark.parametrize("base, key, value, needle", [
    ("vit_b32.yaml", "zoo.checkpoints", "ckpt/{task}/{split}.pt",
     "zoo.checkpoints: 'ckpt/{task}/{split}.pt' has the fields ['split']"),
    ("vit_b32.yaml", "zoo.checkpoints", "ckpt/{task}/{task.__class__}.pt", "has the fields ['task.__class__']"),
    ("vit_b32.yaml", "zoo.checkpoints", "ckpt/{task}/{task!r}.pt", "has the fields ['task!r']"),
    ("vit_b32.yaml", "zoo.checkpoints", "ckpt/{task}/{.pt", "has the fields ['ckpt/{task}/{.pt']"),
    ("fusionbench_vit_b32.yaml", "zoo.checkpoints", {"repo": "org/m_{0}"},
     "zoo.checkpoints.repo: 'org/m_{0}' has the fields ['0']"),
    ("fusionbench_vit_b32.yaml", "zoo.pretrained", {"repo": "org/clip_{task}"},
     "zoo.pretrained.repo: 'org/clip_{task}' is a pattern"),
])
def test_checkpoint_patterns_take_only_the_task_fields(base, key, value, needle):
    why = refusal(set_key(load(base), key, value))
    assert why is not None and needle in why, why


def test_check_lists_every_problem_and_the_numbers_first():
    cfg = set_key(set_key(load("micro.yaml"), "merging.lambda_grid", {"start": 1.0, "stop": 0.0}),
                  "merging.adamerging.clamp", [1, 0])
    validate(cfg, SCHEMA)
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.check(cfg)
    assert str(err.value).startswith("config: 2 problem(s):\n  - merging.lambda_grid: start 1.0")
    set_key(cfg, "merging.adamerging.lr", float("nan"))  # the other rules assume finite numbers
    assert config_checks.problems(cfg) == ["merging.adamerging.lr: nan is not a finite number; give a finite value"]


def test_the_grid_size_is_the_lambda_searchs():
    from pipeline.merging.lambda_search import grid

    for start, stop, step in [(0.0, 1.0, 0.1), (0.2, 0.6, 0.2), (-1.0, 1.0, 0.002), (0.0, 1.0, 0.3)]:
        assert config_checks.grid_points(start, stop, step) == len(grid(start, stop, step))
