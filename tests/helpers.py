"""Small stand-ins shared by several test files."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evotok.teacher import Teacher


class ColourTeacher(Teacher):
    """A hand-built teacher whose answer is known: an image "is" the colour of its mean pixel.

    Patch features are the mean colours of a ``grid``×``grid`` patch grid (C = 3); the image
    embedding is the normalised mean colour; a text's embedding is the RGB of the colour word it
    contains.
    """

    COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}

    def __init__(self, grid: int = 2, image_size: int = 8) -> None:
        super().__init__()
        self.feature_dim, self.embed_dim, self.grid_size, self.image_size = 3, 3, grid, image_size

    def image_features(self, images):
        pooled = F.avg_pool2d(self._prepare_images(images), self.image_size // self.grid_size)
        return pooled.flatten(2).transpose(1, 2)

    def readout(self, features):
        self._check_features(features)
        return F.normalize(features.mean(dim=1), dim=-1)

    def embed_text(self, texts):
        rows = [next(v for k, v in self.COLOURS.items() if k in t) for t in texts]
        return F.normalize(torch.tensor(rows), dim=-1)

    @property
    def logit_scale(self):
        return torch.tensor(10.0)

    @property
    def logit_bias(self):
        return torch.tensor(-5.0)
