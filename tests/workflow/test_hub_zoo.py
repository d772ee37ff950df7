"""The real-zoo workflow end to end against a local stand-in for the Hugging Face Hub:
download -> import -> heads -> image caches -> task vectors -> every merge -> AdaMerging ->
evaluation -> analyses -> report, from a tiny CLIP in FusionBench's exact repo layouts
(HF CLIPModel base, CLIPVisionModel fine-tuned encoders, parquet datasets); then offline
(HF_HUB_OFFLINE=1, the server stopped) nothing is left to do and downloads come from the cache."""

import json

import pandas as pd
import pytest
import torch
import yaml
from helpers.hub_server import HubServer
from helpers.hub_zoo import FINETUNED_REPO, PRETRAINED_REPO, write_dataset_repos, write_model_repos
from helpers.workflow import snakemake

from pipeline.data import suites

pytestmark = pytest.mark.workflow

TASKS = ["EuroSAT", "SVHN", "DTD"]  # SVHN: a dataset with a config (cropped_digits)
SIZES = {"train": 40, "test": 24}
DOWNLOADS = ("download_pretrained", "download_finetuned", "download_dataset")


def config() -> dict:
    return {
        "zoo": {
            "name": "hubzoo",
            "source": "open_clip",
            "arch": "tiny-hub-clip",  # no open_clip architecture: derived from the CLIPModel's config
            "tasks": TASKS,
            "pretrained": {"repo": PRETRAINED_REPO},
            "checkpoints": {"repo": FINETUNED_REPO},
            "datasets": {"source": "hub"},
            "images": {"workers": 2},
        },
        "evaluation": {"batch_size": 32},
        "threads": 1,
        "merging": {
            "adamerging": {"steps": 4, "batch_size": 8, "gpus": 0},
            "fisher_merging": {"examples": 16},
            "regmean": {"examples": 16},
            "regmean_plusplus": {"examples": 16},
            "lambda_grid": {"start": 0.2, "stop": 0.6, "step": 0.2},
        },
        "analysis": {
            "sensitivity": {"enabled": False},
            "surrogate": {"max_samples": 8},
            "robustness": {"adamerging": {"steps": 2}, "max_images": 16, "corruptions": ["gaussian_noise"]},
            "unseen": {"adamerging": {"steps": 2}, "max_images": 16, "variants": ["task_wise"]},
        },
    }


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_model_repos(root, TASKS)
    write_dataset_repos(root, TASKS, SIZES)
    svhn = root / "datasets" / suites.task("SVHN").dataset
    (svhn / "full_numbers").mkdir()  # another config of the repo: never downloaded
    (svhn / "full_numbers" / "train-00000-of-00001.parquet").write_bytes(b"not needed")
    return root


def test_hub_suite_end_to_end_then_offline(hub_root, tmp_path):
    work, cache = tmp_path / "work", tmp_path / "hf_cache"
    work.mkdir()
    (work / "run.yaml").write_text(yaml.safe_dump(config()))
    with HubServer(hub_root) as hub:
        env = hub.env(cache)
        snakemake("--cores", "2", "--configfile", "run.yaml", cwd=work, env=env)
        commits = {repo: hub.commit(repo) for repo in [PRETRAINED_REPO] +
                   [FINETUNED_REPO.format(hub_name=suites.task(t).hub_name) for t in TASKS]}
        requested = list(hub.requests)

    results, models = work / "results/hubzoo", work / "resources/models/hubzoo"
    assert (results / "report/report.html").exists()
    manifest = json.loads((models / "downloads/pretrained.json").read_text())
    assert manifest["commit"] == commits[PRETRAINED_REPO]
    svhn = json.loads((work / "resources/data/hubzoo/downloads/SVHN.json").read_text())
    assert svhn["files"] and all(f.startswith("cropped_digits/") for f in svhn["files"])
    assert not any("full_numbers" in str(r) for r in requested)

    # FusionBench's encoders have no projection: the imported one is the pretrained CLIP's.
    from safetensors.torch import load_file

    pretrained = load_file(str(models / "pretrained.safetensors"))
    for task in TASKS:
        finetuned = load_file(str(models / f"finetuned/{task}.safetensors"))
        assert torch.equal(finetuned["proj"], pretrained["visual.proj"])
        assert not torch.equal(finetuned["conv1.weight"], pretrained["visual.conv1.weight"])

    table = pd.read_parquet(results / "report/accuracy_table.parquet")
    evals = pd.concat(pd.read_parquet(p) for p in (results / "eval").rglob("*.parquet"))
    assert set(evals["task"]) == set(TASKS)
    assert (evals.groupby("model")["n"].sum() == SIZES["test"] * len(TASKS)).all()
    assert {"task_arithmetic", "ties_merging", "fisher_merging", "regmean", "adamerging_layer_wise"} <= set(
        evals["model"]), sorted(set(evals["model"]))
    assert len(table) > 0

    # Offline, server gone: the finished workflow has nothing to do ...
    offline = dict(env, HF_HUB_OFFLINE="1")
    proc = snakemake("-n", "--configfile", "run.yaml", cwd=work, env=offline)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # ... and every download runs again from the cache alone.
    proc = snakemake("--cores", "2", "--configfile", "run.yaml", "--forcerun", *DOWNLOADS, "--until", *DOWNLOADS,
                     cwd=work, env=offline)
    assert json.loads((models / "downloads/pretrained.json").read_text())["commit"] == commits[PRETRAINED_REPO]
