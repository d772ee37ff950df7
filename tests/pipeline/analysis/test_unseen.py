"""Generalisation to unseen tasks: the table, the figure and padded task vectors."""
import torch
from helpers.analysis import _png, _unseen_rows
from torch import nn

from pipeline.analysis import unseen


def test_unseen_table_and_figure(tmp_path):
    table = unseen.unseen_table(_unseen_rows())
    assert list(table.columns) == ["colour", "stripes", "Avg. seen", "size", "Avg. unseen"]
    assert list(table.index) == ["task_arithmetic", "ties_merging", "adamerging_layer_wise"]
    unseen.plot_unseen(_unseen_rows(), tmp_path / "u.png")
    _png(tmp_path / "u.png")


def test_padded_task_vectors_add_zero_rows():
    encoder = nn.Linear(3, 2)
    for p in encoder.parameters():  # (v + 1) - v == 1 exactly (random weights: not always in fp32)
        nn.init.constant_(p, 0.5)
    ft = {k: v + 1 for k, v in encoder.state_dict().items()}
    tvs = unseen.padded_task_vectors(encoder, [ft], extra=2)
    assert tvs.shape == (3, 8) and torch.equal(tvs[0], torch.ones(8)) and not tvs[1:].any()
