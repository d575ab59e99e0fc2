"""What every data source returns, and the one rule that makes sources resumable.

A source is indexable: ``source[i]`` is a pure function of ``(seed, i)``. Randomness for item
``i`` comes from ``item_rng(seed, i)``, never from a shared generator, so a training run's
data position is a single integer.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "Sample",
    "SPLITS",
    "item_rng",
    "check_index",
    "stable_hash",
    "in_heldout_split",
    "validate_split",
]

SPLITS = ("train", "heldout")


@dataclass
class Sample:
    """One image with its text. ``image`` is RGB at the source's native size."""

    image: Image.Image
    caption: str
    source: str
    label: str | None = None
    attributes: dict[str, Any] | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)


def item_rng(seed: int, index: int, *stream: int) -> np.random.Generator:
    """A generator determined by ``(seed, index, *stream)`` alone (no hidden global state)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), *[int(s) for s in stream]])


def check_index(index: Any, length: int | None = None) -> int:
    """Validate an item index: a non-negative integer (below ``length`` when one is given)."""
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"source indices must be integers, got {type(index).__name__}") from None
    if i < 0:
        if length is None:
            raise IndexError(f"negative index {i} on a source without a fixed length")
        i += length
        if i < 0:
            raise IndexError(f"index {index} out of range for length {length}")
    if length is not None and i >= length:
        raise IndexError(f"index {i} out of range for length {length}")
    return i


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and on every machine (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_heldout_split(key: str, heldout_fraction: float = 0.1) -> bool:
    """Deterministic train/held-out assignment of an item by its key (e.g. a relative path)."""
    return (stable_hash(key) % 10_000) < round(heldout_fraction * 10_000)


def validate_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
