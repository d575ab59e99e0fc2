"""A weighted, deterministic mixture of data sources as a torch ``Dataset``.

Item ``i`` draws its source and its index into that source from ``(seed, i)`` alone, so a
``DataLoader`` over ``range(start, ...)`` resumes a run exactly from an integer position.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..images import pil_to_tensor
from .base import Sample, check_index, item_rng, validate_split
from .scenes import SceneWorld
from .sources import ClipArtSource, FashionMNISTSource, ImageFolderSource, MissingDataError, PhotoCropSource

__all__ = [
    "SOURCE_NAMES",
    "DEFAULT_WEIGHTS",
    "MixtureDataset",
    "build_sources",
    "build_mixture",
    "collate",
]

SOURCE_NAMES: tuple[str, ...] = ("scenes", "clipart", "fashion_mnist", "photos", "folder")
DEFAULT_WEIGHTS: dict[str, float] = {"scenes": 0.5, "clipart": 0.2, "fashion_mnist": 0.15, "photos": 0.15}
_CONFIG_KEYS = {"resolution", "seed", "split", "weights", "folder", "length", "skip_missing", "roots"}


class IndexedSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class MixtureDataset(Dataset):
    """Item ``i``: ``{"image": 3×R×R float32 in [-1, 1], "caption", "label", "source"}``.

    Args:
        sources: name -> indexable source (anything with ``len`` and ``[i] -> Sample``).
        weights: name -> non-negative sampling weight (normalised here); every key must be a
            source; sources without a weight (or with weight 0) are never drawn.
        resolution: side of the returned images (shorter side resized, centre crop).
        seed: changes which source and item every index maps to.
        length: the reported ``len`` (a large fixed number: the mixture is a stream).
    """

    def __init__(
        self,
        sources: Mapping[str, IndexedSource],
        weights: Mapping[str, float],
        resolution: int,
        seed: int = 0,
        length: int = 10**8,
    ) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        unknown = set(weights) - set(sources)
        if unknown:
            raise ValueError(f"weights given for sources that are not there: {sorted(unknown)}; sources: {sorted(sources)}")
        bad = {k: w for k, w in weights.items() if not np.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"weights must be finite and non-negative, got {bad}")
        self.names = [name for name in sources if weights.get(name, 0) > 0]
        if not self.names:
            raise ValueError(f"all mixture weights are zero or missing: {dict(weights)}")
        for name in self.names:
            if len(sources[name]) <= 0:
                raise ValueError(f"source {name!r} is empty")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        total = float(sum(weights[n] for n in self.names))
        self.probabilities = {n: float(weights[n]) / total for n in self.names}
        self._cdf = np.cumsum([self.probabilities[n] for n in self.names])
        self.sources = dict(sources)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, index into that source) of mixture item ``index``."""
        i = check_index(index, self.length)
        rng = item_rng(self.seed, i, 0x313)
        k = min(int(np.searchsorted(self._cdf, rng.uniform(), side="right")), len(self.names) - 1)
        name = self.names[k]
        return name, int(rng.integers(len(self.sources[name])))

    def sample(self, index: int) -> Sample:
        """The full ``Sample`` behind item ``index`` (attributes, QA...)."""
        name, j = self.locate(index)
        return self.sources[name][j]

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, j = self.locate(index)
        s = self.sources[name][j]
        return {
            "image": pil_to_tensor(s.image, self.resolution),
            "caption": s.caption,
            "label": s.label or "",
            "source": name,
        }

    def __repr__(self) -> str:
        mix = ", ".join(f"{n}={p:.2f}" for n, p in self.probabilities.items())
        return f"MixtureDataset({mix}; resolution={self.resolution}, seed={self.seed})"


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images into ``b 3 R R``; keep captions, labels and sources as lists of strings."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "label": [item["label"] for item in batch],
        "source": [item["source"] for item in batch],
    }


def build_sources(
    names: Sequence[str],
    resolution: int = 64,
    seed: int = 0,
    split: str = "train",
    folder: Mapping[str, Any] | None = None,
    roots: Mapping[str, str] | None = None,
    skip_missing: bool = False,
) -> dict[str, IndexedSource]:
    """Construct the named sources. Scenes are rendered at ``resolution``; the others keep
    their native size (the mixture resizes). ``folder`` = ``{"root": ..., "captions": ...}``
    configures the "folder" source; ``roots`` overrides the Debian data folders
    (``{"clipart": ..., "fashion_mnist": ...}``). With ``skip_missing`` a source whose data is
    not installed is left out with a warning instead of raising ``MissingDataError``."""
    validate_split(split)
    unknown = [n for n in names if n not in SOURCE_NAMES]
    if unknown:
        raise ValueError(f"unknown source names {unknown}; expected some of {SOURCE_NAMES}")
    roots = dict(roots or {})
    out: dict[str, IndexedSource] = {}
    for name in names:
        try:
            if name == "scenes":
                out[name] = SceneWorld(resolution=resolution, seed=seed, split=split)
            elif name == "clipart":
                kw = {"root": roots["clipart"]} if "clipart" in roots else {}
                out[name] = ClipArtSource(seed=seed, split=split, **kw)
            elif name == "fashion_mnist":
                kw = {"root": roots["fashion_mnist"]} if "fashion_mnist" in roots else {}
                out[name] = FashionMNISTSource(seed=seed, split=split, **kw)
            elif name == "photos":
                out[name] = PhotoCropSource(seed=seed, split=split)
            elif name == "folder":
                if not folder or "root" not in folder:
                    raise ValueError('the "folder" source needs a config {"root": ..., "captions": ... (optional)}')
                out[name] = ImageFolderSource(
                    folder["root"], captions_file=folder.get("captions"), seed=seed,
                    split=folder.get("split"),
                )
        except MissingDataError as exc:
            if not skip_missing:
                raise
            warnings.warn(f"leaving source {name!r} out of the mixture: {exc}", stacklevel=2)
    return out


def build_mixture(config: Mapping[str, Any]) -> MixtureDataset:
    """Build a ``MixtureDataset`` from a config dict such as::

        {"resolution": 64, "seed": 0, "split": "train",
         "weights": {"scenes": 0.5, "clipart": 0.2, "fashion_mnist": 0.15, "photos": 0.15},
         "folder": {"root": "my_images", "captions": "my_images/captions.jsonl"},  # optional
         "skip_missing": False}  # True: drop sources whose Debian package is absent

    Missing keys take the defaults above; unknown keys are an error (they are usually typos).
    """
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown mixture config keys {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
    resolution = int(config.get("resolution", 64))
    seed = int(config.get("seed", 0))
    split = str(config.get("split", "train"))
    weights = dict(config.get("weights") or DEFAULT_WEIGHTS)
    folder = config.get("folder")
    if folder and "folder" not in weights:
        raise ValueError('a "folder" config was given but "folder" has no weight in "weights"')
    names = [n for n, w in weights.items() if w > 0]
    sources = build_sources(
        names, resolution=resolution, seed=seed, split=split, folder=folder,
        roots=config.get("roots"), skip_missing=bool(config.get("skip_missing", False)),
    )
    weights = {n: w for n, w in weights.items() if n in sources}
    kwargs = {"length": int(config["length"])} if "length" in config else {}
    return MixtureDataset(sources, weights, resolution=resolution, seed=seed, **kwargs)
