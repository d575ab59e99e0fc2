"""Gradio components the demo needs beyond the stock ones."""
from __future__ import annotations

import base64
import binascii

import gradio as gr

# Base64 payloads (webcam / pasted images) larger than this are refused before decoding.
MAX_INLINE_BYTES = 50 * 1024 * 1024

from gradio.events import Dependency

class UploadedImage(gr.Image):
    """``gr.Image`` that hands the callback the uploaded file untouched (a path, or bytes).

    The stock ``gr.Image`` opens every upload with PIL before the callback runs, even with
    ``type="filepath"``, so a non-image, a truncated file or a decompression bomb would fail
    inside Gradio with a generic error. Here nothing is decoded: the callback decodes with
    ``evotok.images.load_image_safely`` and reports problems in words. ``is_template`` makes the
    browser use the ordinary image widget. (No ``__init__`` override: Gradio reads the
    component's properties from the constructor signature.)
    """

    is_template = True

    def preprocess(self, payload):  # noqa: D401 - Gradio's hook
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:"):
            encoded = url.split(",", 1)[-1]
            if len(encoded) * 3 // 4 > MAX_INLINE_BYTES:
                raise gr.Error("The pasted image is too large.", print_exception=False)
            try:
                return base64.b64decode(encoded, validate=False)
            except (binascii.Error, ValueError):
                raise gr.Error("The pasted image data is not valid base64.", print_exception=False) from None
        if getattr(payload, "path", None) is None:
            return None
        return str(payload.path)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component