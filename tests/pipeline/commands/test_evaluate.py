"""The evaluate verb with a task-routed method: each task's split is encoded by that task's
model, rebuilt from the saved merge through the method's route."""
import json

import pandas as pd
import torch

from pipeline.cli import main
from pipeline.commands import evaluate as evaluate_module
from pipeline.merging.streamed import task_states
from pipeline.zoo.store import load_clip

TASKS = ["colour", "border"]


def test_a_routed_method_evaluates_task_t_with_model_t(fake_zoo, tmp_path, monkeypatch):
    root = fake_zoo
    zoo = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0}
    base = ["--zoo", json.dumps(zoo), "--threads", "1", "--pretrained", str(root / "pretrained.safetensors")]
    stores = [str(tmp_path / "tv.zarr" / t) for t in TASKS]
    for task, out in zip(TASKS, stores):
        main(["task-vector", *base, "--task", task, "--finetuned", str(root / f"{task}.safetensors"),
              "--chunk-mib", "0.01", "--out", out])
    merge = tmp_path / "emr.safetensors"
    main(["merge", *base, "--method", "emr_merging", "--task-vectors", *stores, "--out", str(merge)])
    storage = json.loads(merge.with_suffix(".json").read_text())["storage"]
    assert storage["bytes"] == merge.stat().st_size
    assert storage["fraction_of_full_models"] < 0.55  # (4 + 2 / 8) / (2 * 4) and the header

    seen, accuracy = {}, evaluate_module.accuracy

    def recording(encoder, head, dataset, batch_size, desc):
        seen[desc.rsplit(" on ", 1)[1]] = {k: v.clone() for k, v in encoder.state_dict().items()}
        return accuracy(encoder, head, dataset, batch_size, desc=desc)

    monkeypatch.setattr(evaluate_module, "accuracy", recording)
    main(["evaluate", *base, "--model", "emr_merging", "--method", "emr_merging", "--encoder", str(merge),
          "--tasks", *TASKS, "--heads", *[str(root / f"{t}.head.safetensors") for t in TASKS],
          "--data", *[str(root / f"{t}.npz") for t in TASKS], "--device", "cpu", "--out", str(tmp_path / "e.parquet")])
    pretrained = load_clip(zoo, root / "pretrained.safetensors").visual.state_dict()
    expected = dict(zip(TASKS, task_states(merge, pretrained, TASKS)))
    assert list(seen) == TASKS
    for task in TASKS:
        assert all(torch.equal(seen[task][k], expected[task][k]) for k in expected[task]), task
    assert not torch.equal(seen["colour"]["conv1.weight"], seen["border"]["conv1.weight"])
    rows = pd.read_parquet(tmp_path / "e.parquet")
    assert rows["task"].tolist() == TASKS and set(rows["method"]) == {"emr_merging"}
