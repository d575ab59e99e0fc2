"""EvoTok's offline data world: procedural scenes, clip art, Fashion-MNIST, photo crops, folders.

Every source is indexable and deterministic (``source[i]`` depends only on its seed and ``i``);
``MixtureDataset`` mixes them by weight into one torch ``Dataset``.
"""
from __future__ import annotations

from .base import Sample, item_rng
from .mixture import DEFAULT_WEIGHTS, SOURCE_NAMES, MixtureDataset, build_mixture, build_sources, collate
from .scenes import (
    COLOURS,
    HELDOUT_PAIRS,
    SCENE_TYPES,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    SceneObject,
    SceneWorld,
    describe_relation,
    render_scene,
    vocabulary,
)
from .sources import (
    ClipArtSource,
    FashionMNISTSource,
    ImageFolderSource,
    MissingDataError,
    PhotoCropSource,
)

__all__ = [
    "Sample",
    "item_rng",
    "SceneWorld",
    "SceneObject",
    "render_scene",
    "describe_relation",
    "vocabulary",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "SCENE_TYPES",
    "HELDOUT_PAIRS",
    "TRAIN_PAIRS",
    "ClipArtSource",
    "FashionMNISTSource",
    "PhotoCropSource",
    "ImageFolderSource",
    "MissingDataError",
    "MixtureDataset",
    "build_sources",
    "build_mixture",
    "collate",
    "SOURCE_NAMES",
    "DEFAULT_WEIGHTS",
]
