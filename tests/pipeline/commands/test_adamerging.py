"""The adamerge verb through the CLI: merged model, lambda and entropy tables."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.adamerging import perturbed_zoo
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import create_model, logits
from pipeline.zoo.store import save_head


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def test_cli_writes_model_lambdas_and_entropy(zoo, tmp_path):
    _, pre, finetuned, heads, _ = zoo
    clip = create_model("synth-vit-tiny", seed=0)
    save_state_dict(clip.state_dict(), tmp_path / "pretrained.safetensors")
    files = {"finetuned": [], "heads": [], "data": []}
    rng = np.random.default_rng(0)
    for t in range(2):
        save_state_dict(finetuned[t], tmp_path / f"ft{t}.safetensors")
        save_head(heads[t], tmp_path / f"head{t}.safetensors")
        np.savez(tmp_path / f"t{t}.npz", x_test=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
                 y_test=np.zeros(20, dtype=np.int64))
        files["finetuned"].append(str(tmp_path / f"ft{t}.safetensors"))
        files["heads"].append(str(tmp_path / f"head{t}.safetensors"))
        files["data"].append(str(tmp_path / f"t{t}.npz"))
    zoo_cfg = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0}
    out = tmp_path / "out"
    main([
        "adamerge", "--zoo", json.dumps(zoo_cfg), "--variant", "task_wise_plus",
        "--pretrained", str(tmp_path / "pretrained.safetensors"), "--finetuned", *files["finetuned"],
        "--heads", *files["heads"], "--tasks", "a", "b", "--data", *files["data"],
        "--settings", json.dumps({"steps": 3, "log_every": 2}), "--max-images", "10", "--device", "cpu",
        "--out", str(out / "model.safetensors"), "--lambdas", str(out / "lambdas.parquet"),
        "--entropy", str(out / "entropy.parquet"), "--threads", "1",
    ])
    merged = load_file(str(out / "model.safetensors"))
    assert merged.keys() == pre.keys()
    lam = pd.read_parquet(out / "lambdas.parquet")
    assert set(lam["task"]) == {"a", "b"} and set(lam["step"]) == {0, 2, 3} and lam["tensor"].isna().all()
    ent = pd.read_parquet(out / "entropy.parquet")
    assert len(ent) == 3 and (ent["variant"] == "task_wise_plus").all()
    # the merged encoder gives finite logits
    enc = clip.visual
    enc.load_state_dict(merged)
    assert torch.isfinite(logits(enc(torch.randn(2, 3, 32, 32)), heads[0])).all()
