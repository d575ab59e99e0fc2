"""The EvoTok demo: page layout and thin callbacks over ``evotok.explore`` (nothing model-specific)."""
from __future__ import annotations

from .callbacks import Callbacks, OutputFiles
from .layout import build_demo, find_examples

__all__ = ["Callbacks", "OutputFiles", "build_demo", "find_examples"]
