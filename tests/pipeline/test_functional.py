"""The flat layout of a state dict: views into one flat vector, and block indices."""
import pytest
import torch
from helpers.adamerging import perturbed_zoo

from pipeline.functional import FlatLayout


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def test_views_share_the_flat_vector(zoo):
    layout = FlatLayout.of(zoo[1])
    flat = layout.flatten(zoo[1])
    views = layout.unflatten(flat)
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= v.data_ptr() < end for v in views.values())
    assert all(torch.equal(views[k], zoo[1][k]) for k in layout.names)
    assert layout.block_index(layout.names.index("transformer.resblocks.2.ln_1.weight")) == 2
    assert layout.block_index(layout.names.index("conv1.weight")) is None
