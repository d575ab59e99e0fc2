"""The EvoTok demo: page layout and thin callbacks over ``evotok.explore`` and
``evotok.mllm.serving`` (nothing model-specific)."""
from __future__ import annotations

from .callbacks import Callbacks, OutputFiles
from .layout import build_demo, find_examples
from .multimodal_callbacks import MultimodalCallbacks
from .multimodal_layout import ask_examples

__all__ = ["Callbacks", "MultimodalCallbacks", "OutputFiles", "ask_examples", "build_demo", "find_examples"]
