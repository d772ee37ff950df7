"""The task_vectors / AdaMerging release format in miniature: an ``ImageEncoder`` object whose
``.model`` is an open_clip CLIP (text tower removed, as in the release), saved whole with
``torch.save(obj)``."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.clip import SYNTHETIC_ARCH, create_model


class ImageEncoder(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.model = create_model(SYNTHETIC_ARCH, seed=seed)
        del self.model.transformer  # the release drops the text transformer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)
