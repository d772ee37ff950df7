"""The robustness analysis: normalisation round trip, corrupted splits and the figure."""
import numpy as np
import torch
from helpers.analysis import _png, _robustness_rows
from torch.utils.data import TensorDataset

from pipeline.analysis import robustness
from pipeline.data.synthetic import render


def test_normalisation_round_trip_is_exact():
    zoo = {"source": "synthetic"}
    images = render(3, 2).images
    np.testing.assert_array_equal(robustness.to_uint8(robustness.to_normalised(images, zoo), zoo), images)


def test_robustness_figure(tmp_path):
    robustness.plot_robustness(_robustness_rows(), tmp_path / "r.png")
    _png(tmp_path / "r.png")


def test_corrupted_split_keeps_labels():
    zoo = {"source": "synthetic"}
    images = render(5, 3).images
    data = TensorDataset(robustness.to_normalised(images, zoo), torch.arange(5))
    out = robustness.corrupted_split(data, zoo, "pixelate", 3, seed=0)
    assert out.tensors[0].shape == data.tensors[0].shape and torch.equal(out.tensors[1], data.tensors[1])
    assert not torch.equal(out.tensors[0], data.tensors[0])
    assert torch.equal(robustness.corrupted_split(data, zoo, "clean", 3, 0).tensors[0], data.tensors[0])
