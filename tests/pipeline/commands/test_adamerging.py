"""The adamerge verb through the CLI: merged model, lambda and entropy tables."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.adamerging import perturbed_zoo, verb_inputs
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import create_model, logits
from pipeline.zoo.store import save_head


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def adamerge_args(tmp_path, finetuned, heads) -> list[str]:
    """The adamerge verb's inputs for two synthetic tasks "a" and "b" of 20 test images, written
    under ``tmp_path``; its outputs under ``tmp_path / "out"``."""
    common = verb_inputs(tmp_path, finetuned, heads)
    out = tmp_path / "out"
    return ["adamerge", *common, "--out", str(out / "model.safetensors"), "--lambdas", str(out / "lambdas.parquet"),
            "--entropy", str(out / "entropy.parquet"), "--threads", "1"]


def test_cli_writes_model_lambdas_and_entropy(zoo, tmp_path):
    _, pre, finetuned, heads, _ = zoo
    clip = create_model("synth-vit-tiny", seed=0)
    out = tmp_path / "out"
    main([*adamerge_args(tmp_path, finetuned, heads), "--variant", "task_wise_plus",
          "--settings", json.dumps({"steps": 3, "log_every": 2, "batch_size": 5}), "--max-images", "10"])
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


def test_cli_on_image_caches_equals_adamerging_on_their_tensors(zoo, tmp_path):
    """A real zoo's tasks read from image caches (rows sampled from disk) learn the same
    coefficients as the same images held in tensors."""
    from PIL import Image

    from pipeline.data.image_cache import DecodedImages, decode_split
    from pipeline.merging import adamerging as am

    _, _, finetuned, heads, _ = zoo
    clip = create_model("synth-vit-tiny", seed=0)
    save_state_dict(clip.state_dict(), tmp_path / "pretrained.safetensors")
    rng = np.random.default_rng(0)
    args = {"--finetuned": [], "--heads": [], "--data": []}
    for t in range(2):
        save_state_dict(finetuned[t], tmp_path / f"ft{t}.safetensors")
        save_head(heads[t], tmp_path / f"head{t}.safetensors")
        images = [(Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)), 0) for _ in range(20)]
        decode_split(images, 32, tmp_path / f"data{t}" / "test", threads=1)
        args["--finetuned"].append(str(tmp_path / f"ft{t}.safetensors"))
        args["--heads"].append(str(tmp_path / f"head{t}.safetensors"))
        args["--data"].append(str(tmp_path / f"data{t}"))
    zoo_cfg = {"name": "t", "source": "open_clip", "arch": "synth-vit-tiny", "seed": 0}
    main(["adamerge", "--zoo", json.dumps(zoo_cfg), "--variant", "layer_wise",
          "--pretrained", str(tmp_path / "pretrained.safetensors"), *[a for k, v in args.items() for a in (k, *v)],
          "--tasks", "a", "b", "--settings", json.dumps({"steps": 3, "batch_size": 6}), "--max-images", "12",
          "--device", "cpu",
          "--out", str(tmp_path / "model.safetensors"), "--lambdas", str(tmp_path / "lambdas.parquet"),
          "--entropy", str(tmp_path / "entropy.parquet"), "--threads", "1"])
    rows = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:12]  # the verb's subset (seed 0)
    tensors = [DecodedImages(tmp_path / f"data{t}" / "test")[:][0][rows] for t in range(2)]
    ref = am.adamerge("layer_wise", clip.visual, finetuned[:2], heads[:2], tensors, am.Settings(steps=3, batch_size=6),
                      device="cpu", progress=False)
    assert pd.read_parquet(tmp_path / "entropy.parquet")["entropy"].tolist() == ref.entropy
    merged = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(merged[k], v) for k, v in ref.state_dict.items())


def test_cli_refuses_a_nan_encoder_a_diverged_run_and_small_test_sets(zoo, tmp_path):
    """No model is written: a NaN fine-tuned encoder is refused on loading, a diverged run at
    its first non-finite step, a test set smaller than a step's batches before the run."""
    _, _, finetuned, heads, _ = zoo
    out = tmp_path / "out"
    broken = [{k: v.clone() for k, v in sd.items()} for sd in finetuned[:2]]
    broken[1]["proj"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"encoder \S+ft1\.safetensors: tensor 'proj' contains NaN or Inf"):
        main([*adamerge_args(tmp_path, broken, heads), "--variant", "task_wise"])
    args = adamerge_args(tmp_path, finetuned, heads)
    with pytest.raises(FloatingPointError, match=r"AdaMerging layer_wise: the entropy loss is nan at step 1 "
                                                 r"\(lr 1e\+38\).*Lower lr"):
        main([*args, "--variant", "layer_wise", "--settings", json.dumps({"steps": 20, "lr": 1e38, "batch_size": 10})])
    with pytest.raises(ValueError, match=r"AdaMerging task_wise: task 'a' has 12 unlabeled test images, fewer than "
                                         r"batch_size 16 x batches_per_task 2 = 32.*allow_small_test_sets: true"):
        main([*args, "--variant", "task_wise", "--max-images", "12", "--settings", json.dumps({"steps": 1})])
    assert not out.exists()
    main([*args, "--variant", "task_wise", "--max-images", "12",
          "--settings", json.dumps({"steps": 1, "allow_small_test_sets": True})])
    assert (out / "model.safetensors").exists()
