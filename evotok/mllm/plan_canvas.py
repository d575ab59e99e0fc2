"""The plan canvas: each drawn cell is told which planned object covers it, as an input.

A model that writes layout plans (:mod:`evotok.mllm.layout_plan`) gets the count, the binding and
the places right in text, and its drawings still miss them: without the canvas, on held-out
colour–shape pairs only about one plan entry in six had the planned object drawn at its cell
(stage 21 in the model card; about one in three with it, stage 22). Every cell has to find, by
attention over the plan's text, which entry covers it and what that entry says, and the code loss
asks for that only at the few cells where an object begins.

The canvas gives each cell that answer directly, the way layout-conditioned image generators feed
a layout map: for each plan entry, the cells an object of its size covers when centred on its cell
(:func:`evotok.mllm.plan_guidance.planned_cells`) receive the sum of four learned vectors, one each
for the entry's colour, shape and size and one for the cell's offset from the entry's centre cell
(which part of the shape it is). Colour and shape stay separate factors, so a held-out pair is a
new sum of vectors that were each trained. The vector for cell ``k`` is added to the LM input
whose hidden state draws cell ``k`` (``<boi>`` for the first cell, cell ``k − 1`` after it).

Training builds the canvas from the scene world's exact plan and sampling from the plan the model
wrote, so both see the same form. Drawings without a plan (the unconditional branch, clip-art,
Fashion-MNIST) get an empty canvas. The tables start at zero: a trained model draws as before
until they learn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.scenes import COLOURS, SHAPES, SIZES
from .layout_plan import PlannedObject
from .plan_guidance import planned_cells

__all__ = ["canvas_ids", "stack_canvases", "PlanCanvas", "OFFSET_REACH"]

OFFSET_REACH = 3  # offsets from the entry's centre cell are clamped to ±3 cells on each axis
_FIELDS = 4  # colour, shape, size, offset


def canvas_ids(plan: Sequence[PlannedObject], grid: int) -> np.ndarray:
    """``grid² × slots × 4`` indices (colour, shape, size, offset) of the plan entries covering each
    cell, in raster order; -1 pads the slots of cells covered by fewer entries than the most
    covered cell. An empty plan gives ``grid² × 0 × 4``."""
    per_cell: list[list[tuple[int, int, int, int]]] = [[] for _ in range(grid * grid)]
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    span = 2 * OFFSET_REACH + 1
    for entry in plan:
        for cell in np.flatnonzero(planned_cells(entry, grid)):
            dr = int(np.clip(cell // grid - entry.row, -OFFSET_REACH, OFFSET_REACH))
            dc = int(np.clip(cell % grid - entry.col, -OFFSET_REACH, OFFSET_REACH))
            per_cell[cell].append((colours.index(entry.colour), shapes.index(entry.shape), sizes.index(entry.size),
                                   (dr + OFFSET_REACH) * span + dc + OFFSET_REACH))
    slots = max(len(c) for c in per_cell)
    out = np.full((grid * grid, slots, _FIELDS), -1, dtype=np.int64)
    for cell, entries in enumerate(per_cell):
        if entries:
            out[cell, : len(entries)] = entries
    return out


def stack_canvases(canvases: Sequence[np.ndarray | None], cells: int) -> torch.Tensor:
    """One ``n × cells × slots × 4`` tensor of several drawings' :func:`canvas_ids` (``None``: an
    empty canvas), padded with -1 to the most slots."""
    slots = max([c.shape[1] for c in canvases if c is not None] + [0])
    out = np.full((len(canvases), cells, slots, _FIELDS), -1, dtype=np.int64)
    for i, canvas in enumerate(canvases):
        if canvas is not None:
            out[i, :, : canvas.shape[1]] = canvas
    return torch.from_numpy(out)


class PlanCanvas(nn.Module):
    """Learned vectors of the planned colour, shape, size and offset, summed per cell."""

    def __init__(self, hidden: int):
        super().__init__()
        span = 2 * OFFSET_REACH + 1
        self.colour = nn.Embedding(len(COLOURS), hidden)
        self.shape = nn.Embedding(len(SHAPES), hidden)
        self.size = nn.Embedding(len(SIZES), hidden)
        self.offset = nn.Embedding(span * span, hidden)
        for table in (self.colour, self.shape, self.size, self.offset):
            nn.init.zeros_(table.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``... × slots × 4`` indices (-1: no entry) -> ``... × hidden``, summed over the slots."""
        present = (ids[..., 0] >= 0).unsqueeze(-1)
        safe = ids.clamp(min=0)
        vectors = (self.colour(safe[..., 0]) + self.shape(safe[..., 1]) + self.size(safe[..., 2])
                   + self.offset(safe[..., 3]))
        return (vectors * present.to(vectors.dtype)).sum(-2)
