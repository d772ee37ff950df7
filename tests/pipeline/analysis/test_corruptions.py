"""The image corruptions: shape, dtype and determinism, and refusals."""
import numpy as np
import pytest

from pipeline.analysis.corruptions import CORRUPTIONS, corrupt
from pipeline.data.synthetic import render


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_keeps_shape_and_dtype_and_changes_the_image(name):
    images = render(4, seed=1).images
    for severity in (1, 5):
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - images).mean() > 1.0, (name, severity)
    single = corrupt(images[0], name, 3)
    assert single.shape == images[0].shape and single.dtype == np.uint8 and not np.array_equal(single, images[0])
    np.testing.assert_array_equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7))


def test_corruption_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(render(1, 0).images, "fog")
    with pytest.raises(ValueError, match="severity"):
        corrupt(render(1, 0).images, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(np.zeros((2, 8, 8, 3), np.float32), "contrast")
