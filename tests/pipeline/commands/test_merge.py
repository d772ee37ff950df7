"""The merge verbs (task-vector, merge, lambda-search) through the CLI on a fabricated
synthetic-format zoo (the ``fake_zoo`` fixture of conftest.py)."""
import json

import pandas as pd
import pytest
import torch
from helpers.merging import FT_CFG, assert_state_close, merged

from pipeline.cli import main
from pipeline.store.task_vectors import TaskVectorStore


def _zoo_args(root):
    zoo = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0,
           "synthetic": {"finetune": {"steps": 2, "batch_size": 4, "lr": 1e-4, "weight_decay": 0.0, "warmup": 1}}}
    return ["--zoo", json.dumps(zoo), "--threads", "1", "--pretrained", str(root / "pretrained.safetensors")]


def test_cli_verbs(fake_zoo):
    root, tasks = fake_zoo, ["colour", "border"]
    base = _zoo_args(root)
    for t in tasks:
        main(["task-vector", *base, "--task", t, "--finetuned", str(root / f"{t}.safetensors"),
              "--chunk-mib", "0.01", "--out", str(root / "tv.zarr" / t)])
    tvs = [str(root / "tv.zarr" / t) for t in tasks]
    heads_data = ["--heads", *[str(root / f"{t}.head.safetensors") for t in tasks],
                  "--data", *[str(root / f"{t}.npz") for t in tasks]]
    main(["merge", *base, "--method", "weight_averaging", "--task-vectors", *tvs, "--out", str(root / "wa.safetensors")])
    main(["merge", *base, "--method", "task_negation", "--task-vectors", tvs[0], "--settings", '{"lam": -1.0}',
          "--out", str(root / "neg.safetensors")])
    main(["lambda-search", *base, "--method", "ties_merging", "--task-vectors", *tvs, *heads_data,
          "--settings", '{"k": 20, "merge": "mean"}', "--grid", '{"start": 0.0, "stop": 1.0, "step": 0.5}',
          "--search-out", str(root / "search.parquet"), "--out", str(root / "ties.safetensors")])
    search = pd.read_parquet(root / "search.parquet")
    assert list(search.columns) == ["method", "lambda", "task", "split", "accuracy"]
    assert len(search) == 3 * 2 and set(search["split"]) == {"val"}
    record = json.loads((root / "ties.json").read_text())
    best = search.groupby("lambda")["accuracy"].mean().idxmax()
    assert record["settings"]["lam"] == best and record["tasks"] == tasks
    from pipeline.zoo.store import load_clip, load_encoder_state
    pretrained = load_clip({"arch": "synth-vit-tiny"}, root / "pretrained.safetensors").visual.state_dict()
    expected = merged("ties_merging", pretrained, TaskVectorStore(root / "tv.zarr", tasks), k=20, merge="mean", lam=best)
    assert_state_close(load_encoder_state(root / "ties.safetensors"), expected, exact=True)
    # every grid point is evaluated from the pretrained weights, not from the previous point
    main(["lambda-search", *base, "--method", "task_arithmetic", "--task-vectors", *tvs, *heads_data,
          "--grid", '{"start": 0.5, "stop": 0.5, "step": 0.1}', "--search-out", str(root / "ta.parquet"),
          "--out", str(root / "ta.safetensors")])
    ta = pd.read_parquet(root / "ta.parquet")
    torch.testing.assert_close(ta["accuracy"].tolist(), search[search["lambda"] == 0.5]["accuracy"].tolist())
    for method, settings in (("fisher_merging", '{"examples": 4}'), ("regmean", '{"examples": 8}'),
                             ("regmean_plusplus", '{"examples": 8}')):
        main(["merge", *base, "--method", method, "--tasks", *tasks,
              "--finetuned", *[str(root / f"{t}.safetensors") for t in tasks], *heads_data,
              "--settings", settings, "--out", str(root / f"{method}.safetensors")])
    # the record holds the settings that ran, defaults included: which Fisher estimator, RegMean's alpha
    assert json.loads((root / "fisher_merging.json").read_text())["settings"] == {
        "examples": 4, "min_fisher": 1e-6, "normalize": True, "estimator": "exact", "batch_size": 32}
    assert json.loads((root / "regmean.json").read_text())["settings"] == {"examples": 8, "alpha": 0.95}
    main(["merge", *base, "--method", "multitask", "--tasks", *tasks, *heads_data,
          "--settings", json.dumps(FT_CFG | {"steps": 2}), "--out", str(root / "mtl.safetensors")])
    reference = load_encoder_state(root / "colour.safetensors")
    for name in ("wa", "neg", "ties", "fisher_merging", "regmean", "regmean_plusplus", "mtl"):
        state = load_encoder_state(root / f"{name}.safetensors")
        assert state.keys() == reference.keys() and all(bool(torch.isfinite(v).all()) for v in state.values()), name
        assert (root / f"{name}.json").exists()


def test_open_store_checks_the_finetuned_checkpoints_it_is_given(fake_zoo, tmp_path):
    from pipeline.commands.loading import open_store

    root, tasks = fake_zoo, ["colour", "border"]
    base = _zoo_args(root)
    tvs = [str(tmp_path / "tv.zarr" / t) for t in tasks]
    for t, out in zip(tasks, tvs):
        main(["task-vector", *base, "--task", t, "--finetuned", str(root / f"{t}.safetensors"), "--out", out])
    zoo, pretrained = json.loads(base[1]), str(root / "pretrained.safetensors")
    finetuned = [str(root / f"{t}.safetensors") for t in tasks]
    assert open_store(zoo, pretrained, tvs, finetuned)[2].tasks == tasks
    with pytest.raises(ValueError, match=r"task 'colour' .*, but .*border.safetensors has sha256 .*another task's"):
        open_store(zoo, pretrained, tvs, finetuned[::-1])
    with pytest.raises(ValueError, match="1 --finetuned checkpoints for 2 --task-vectors"):
        open_store(zoo, pretrained, tvs, finetuned[:1])


def test_analyses_stream_within_the_given_budget(fake_zoo, tmp_path):
    """merging.budget_mib reaches the analyses that merge from the store: 10 KiB is too little
    for the 19.2 KiB blocks of this store, and each verb says so (instead of using 1024 MiB)."""
    root, tasks = fake_zoo, ["colour", "border"]
    base = _zoo_args(root)
    for t in tasks:
        main(["task-vector", *base, "--task", t, "--finetuned", str(root / f"{t}.safetensors"),
              "--chunk-mib", "0.01", "--out", str(tmp_path / "tv.zarr" / t)])
    common = [*base, "--task-vectors", *[str(tmp_path / "tv.zarr" / t) for t in tasks],
              "--heads", *[str(root / f"{t}.head.safetensors") for t in tasks],
              "--data", *[str(root / f"{t}.npz") for t in tasks], "--budget-mib", str(10 / 1024)]
    out = ["--out", str(tmp_path / "out.parquet")]
    lambdas = ["--lambdas", json.dumps({"task_arithmetic": 0.3, "ties_merging": 0.3}), "--ties", '{"k": 20}']
    verbs = [
        ["analysis-surrogate", "--lambdas", "0.3", "--figure", str(tmp_path / "f.png"),
         "--spearman-out", str(tmp_path / "s.parquet"), *out],
        ["analysis-sensitivity-test", "--method", "task_arithmetic", "--grid", '{"start": 0, "stop": 1, "step": 0.5}',
         *out],
        ["analysis-unseen", "--variant", "baselines", "--tasks", *tasks, "--seen", "colour", "--unseen", "border",
         *lambdas, *out],
        ["analysis-robustness", "--finetuned", *[str(root / f"{t}.safetensors") for t in tasks],
         "--corruption", "clean", "--adamerging", '{"steps": 1, "batch_size": 4}', *lambdas, *out],
    ]
    for verb in verbs:
        with pytest.raises(ValueError, match=r"takes 19\.2 KiB, more than half the memory budget of 10 KiB"):
            main([verb[0], *common, *verb[1:]])
    assert not (tmp_path / "out.parquet").exists()


def test_sensitivity_test_curve_refuses_a_method_without_a_lambda(tmp_path):
    from pipeline.commands.analysis_sensitivity import analysis_sensitivity_test

    with pytest.raises(ValueError, match="weight_averaging has no searched lambda; searched: .*task_arithmetic"):
        analysis_sensitivity_test({}, "weight_averaging", "p", [], [], {"start": 0, "stop": 1, "step": 0.5},
                                  str(tmp_path / "out.parquet"))
    assert not (tmp_path / "out.parquet").exists()
