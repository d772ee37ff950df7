"""The synthetic scenes: labels in range, uint8 images, every class present."""

import numpy as np

from pipeline.data import synthetic as syn


def test_render_labels_are_in_range_and_images_uint8():
    scenes = syn.render(200, seed=1, overlay="bar")
    assert scenes.images.shape == (200, 32, 32, 3) and scenes.images.dtype == np.uint8
    for name, labels in scenes.labels.items():
        assert labels.min() >= 0 and labels.max() < len(syn.ATTRIBUTES[name].classnames)
    # every class of every attribute appears in a batch this size
    assert all(len(np.unique(v)) == len(syn.ATTRIBUTES[k].classnames) for k, v in scenes.labels.items())
