"""Accuracy: image caches and tensors read in slices give what item-by-item batches give."""
import torch
from helpers.images import SHAPES, Items, pil_images
from torch.utils.data import TensorDataset

from pipeline.data.image_cache import DecodedImages, decode_split
from pipeline.evaluation import accuracy, batches
from pipeline.models.clip import create_model


class ItemByItem(torch.utils.data.Dataset):
    """The same items without slicing: DataLoader's default batches."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_evaluation_over_the_cache_equals_evaluation_over_its_tensors(tmp_path):
    decode_split(Items(pil_images(SHAPES * 3)), 32, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    tensors = TensorDataset(*cache[:])
    for (x, y), (xt, yt), (xi, yi) in zip(batches(cache, 7), batches(tensors, 7), batches(ItemByItem(cache), 7),
                                          strict=True):
        assert torch.equal(x, xt) and torch.equal(y, yt) and torch.equal(x, xi) and torch.equal(y, yi)
    assert [len(y) for _, y in batches(cache, 7)] == [7, 7, 7, 3]
    encoder = create_model("synth-vit-tiny", seed=0).visual
    head = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    a, b = accuracy(encoder, head, cache, 5), accuracy(encoder, head, tensors, 5)
    assert (a["accuracy"], a["n"]) == (b["accuracy"], b["n"]) and a["n"] == len(cache)


def test_non_finite_logits_are_refused_not_scored(tmp_path):
    """A model with NaN weights used to score 1/classes (argmax of NaN); evaluating it now fails,
    naming what was evaluated, and the evaluate verb refuses such a file on loading."""
    import json

    import numpy as np
    import pytest
    from safetensors.torch import save_file

    from pipeline.cli import main
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.zoo.store import save_head

    encoder = create_model("synth-vit-tiny", seed=0).visual
    head = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    data = TensorDataset(torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.int64))
    broken = {k: v.clone() for k, v in encoder.state_dict().items()}
    broken["proj"][0, 0] = float("nan")
    encoder.load_state_dict(broken)
    with pytest.raises(FloatingPointError, match=r"merged on t: NaN or Inf logits on examples 0 to 3"):
        accuracy(encoder, head, data, 4, desc="merged on t")

    save_state_dict(create_model("synth-vit-tiny", seed=0).state_dict(), tmp_path / "pre.safetensors")
    save_file(broken, tmp_path / "merged.safetensors")  # written by something that does not check
    save_head(head, tmp_path / "head.safetensors")
    np.savez(tmp_path / "t.npz", x_test=np.zeros((4, 32, 32, 3), dtype=np.uint8), y_test=np.zeros(4, dtype=np.int64))
    zoo = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0}
    with pytest.raises(ValueError, match=r"encoder \S+merged\.safetensors: tensor 'proj' contains NaN or Inf"):
        main(["evaluate", "--zoo", json.dumps(zoo), "--pretrained", str(tmp_path / "pre.safetensors"),
              "--model", "m", "--method", "m", "--tasks", "t", "--heads", str(tmp_path / "head.safetensors"),
              "--out", str(tmp_path / "eval.parquet"), "--encoder", str(tmp_path / "merged.safetensors"),
              "--data", str(tmp_path / "t.npz"), "--device", "cpu"])
    assert not (tmp_path / "eval.parquet").exists()
