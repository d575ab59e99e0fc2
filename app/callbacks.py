"""Thin callbacks: turn ``evotok.explore`` results into what the Gradio components display.

Every callback converts user mistakes into a short ``gr.Error`` message and any unexpected
failure into a generic one (the details go to the server log), so no stack trace reaches the page
and one bad request never takes the app down.
"""
from __future__ import annotations

import functools
import html
import inspect
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np
from PIL import Image

from evotok.explore import (Explorer, codebook_figure, codes_figure, codes_to_json, metrics_figure, probe_figure,
                            probe_rows, umap_figure, upscale_for_display)
from evotok.hub import CheckpointError
from evotok.images import ImageError, tensor_to_pil

log = logging.getLogger("evotok.app")

USER_ERRORS = (ImageError, CheckpointError, ValueError)


def user_errors(action: str) -> Callable:
    """Decorator: known input problems -> their message; anything else -> a generic message.

    Works on plain callbacks and on generator callbacks (streaming), whose errors surface while
    they are iterated, not when they are called.
    """

    def convert(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, USER_ERRORS):
            return gr.Error(html.escape(str(err)), title=f"Could not {action}", print_exception=False)
        if isinstance(err, MemoryError):
            return gr.Error("The server ran out of memory on this input; try a smaller image.",
                            title=f"Could not {action}", print_exception=False)
        log.error("unexpected error while trying to %s", action, exc_info=err)  # the log gets the traceback
        return gr.Error(f"Something went wrong ({type(err).__name__}); the server log has the details.",
                        title=f"Could not {action}", print_exception=False)

    def wrap(fn: Callable) -> Callable:
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def streaming(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as err:  # MemoryError included
                    raise convert(err) from None

            return streaming

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MemoryError included
                raise convert(err) from None

        return inner

    return wrap


class OutputFiles:
    """A private folder for files handed to the browser (code downloads), pruned by age."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = 3600.0) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="evotok-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s

    def write_json(self, stem: str, payload: dict) -> str:
        self._prune()
        path = self.root / f"{stem}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(payload, separators=(",", ":")))
        return str(path)

    def _prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for old in self.root.glob("*.json"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass


class Callbacks:
    """The demo's event handlers, bound to one loaded ``Explorer``."""

    def __init__(self, explorer: Explorer, cache_dir: str | os.PathLike | None = None, umap_per_source: int = 100,
                 display_side: int = 256, outputs: OutputFiles | None = None) -> None:
        self.explorer = explorer
        self.cache_dir = cache_dir
        self.umap_per_source = umap_per_source
        self.display_side = display_side
        self.outputs = outputs or OutputFiles()

    # -- stage explorer ---------------------------------------------------------------------------
    @user_errors("explore this image")
    def explore(self, image: Any, labels: str | None):
        """Image + label list -> input, gallery, charts, probe, codes, note and the slider state."""
        if image is None or (isinstance(image, (str, bytes)) and len(image) == 0):
            raise gr.Error("Upload an image first (or click one of the examples).", title="No image",
                           print_exception=False)
        result = self.explorer.explore(image, labels)
        headers, rows = probe_rows(result)
        codes_file = self.outputs.write_json("evotok-codes", codes_to_json(result, self.explorer.source))
        state = {
            "images": [np.asarray(tensor_to_pil(r)) for r in result.reconstructions],
            "captions": [result.caption(d, long=True) for d in result.depths],
        }
        return (
            result.input_image(self.display_side),
            result.gallery(self.display_side),
            metrics_figure(result),
            probe_figure(result),
            {"headers": headers, "data": rows} if rows else {"headers": headers, "data": [["—"] * len(headers)]},
            codes_figure(result),
            codes_file,
            result.summary_markdown(),
            state,
        )

    def show_depth(self, state: dict | None, depth: float | None):
        """The reconstruction at one depth, large (from the last explore of this session)."""
        if not state or not state.get("images"):
            return gr.Image(value=None, label="Reconstruction at the chosen depth")
        index = min(max(int(depth or 1), 1), len(state["images"])) - 1
        image = upscale_for_display(Image.fromarray(np.asarray(state["images"][index], dtype=np.uint8)),
                                    self.display_side)
        return gr.Image(value=image, label=state["captions"][index])

    # -- codebook ---------------------------------------------------------------------------------
    @user_errors("read the codebook statistics")
    def codebook(self):
        stats = self.explorer.codebook_stats()
        return codebook_figure(stats, self.explorer.config.codebook_size), self.explorer.codebook_markdown(stats)

    @user_errors("compute the UMAP")
    def umap(self, depth: float, kind: str, colour_by: str, progress=gr.Progress()):
        kind = {"semantic decoder output": "semantic", "prefix latent": "latent"}.get(kind, kind)
        colour_by = "source" if str(colour_by).lower().startswith("source") else "label"
        started = time.perf_counter()
        embedding, samples, cached = self.explorer.umap(
            int(depth), kind, cache_dir=self.cache_dir, per_source=self.umap_per_source,
            progress=lambda fraction, message: progress(fraction, desc=message))
        seconds = time.perf_counter() - started
        note = (f"{len(samples.labels)} held-out images "
                f"({', '.join(f'{n} {s}' for s, n in _counts(samples.sources).items())}), depth {int(depth)}; "
                f"{'loaded from the cache' if cached else 'computed'} in {seconds:.1f} s.")
        if samples.notes:
            note += " " + " ".join(samples.notes)
        return umap_figure(embedding, samples, int(depth), kind, colour_by), note


def _counts(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
