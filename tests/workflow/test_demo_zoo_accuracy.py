"""The demo's synthetic zoo (config/config.yaml, seed 0) shows the paper's ordering:
layer-wise AdaMerging above task-wise AdaMerging above Task Arithmetic at its best lambda.

Builds the part of the demo these three rows need (pretraining, the 8 main tasks, their task
vectors, the lambda search, two AdaMerging runs): about 6 minutes on 2 cores."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers.workflow import REPO, snakemake

pytestmark = pytest.mark.workflow

METHODS = ("task_arithmetic", "adamerging_task_wise", "adamerging_layer_wise")


def test_layer_wise_adamerging_beats_task_wise_and_task_arithmetic(tmp_path: Path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    targets = [f"results/synthetic/eval/{m}.parquet" for m in METHODS]
    snakemake("--cores", "2", *targets, cwd=tmp_path)
    avg = {}
    for method, target in zip(METHODS, targets):
        rows = pd.read_parquet(tmp_path / target)
        assert set(rows["split"]) == {"test"} and len(rows) == 8
        avg[method] = rows["accuracy"].mean()
    # measured 2026-11-27: Task Arithmetic 72.0 (lambda 0.3 from the validation grid),
    # task-wise 74.7, layer-wise 76.1 (the paper: 69.1, 71.1, 80.1). The goal: layer-wise
    # at least 3 points above Task Arithmetic at its best lambda, and above task-wise.
    assert avg["adamerging_layer_wise"] >= avg["task_arithmetic"] + 3.0, avg
    assert avg["adamerging_layer_wise"] > avg["adamerging_task_wise"] + 1.0, avg
    assert avg["adamerging_task_wise"] > avg["task_arithmetic"] + 1.0, avg
