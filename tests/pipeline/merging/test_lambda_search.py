"""The lambda grid of the searched methods."""
import pytest

from pipeline.merging.lambda_search import grid


def test_grid():
    assert grid(0.0, 1.0, 0.1) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(ValueError, match="step"):
        grid(0.0, 1.0, 0.0)
