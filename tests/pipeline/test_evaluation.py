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
