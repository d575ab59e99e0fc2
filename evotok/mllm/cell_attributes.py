"""What each drawn cell shows, as an auxiliary target for the hidden state that draws it.

While drawing, the LM's hidden state before cell ``k`` is all the depth transformer gets to choose
that cell's codes from. The bundled model draws held-out colour-shape pairs badly, and probes show
why this may be: the depth head generalises to a new pair when its input carries colour and shape
as separate factors (``training/bench_code_head_probe.py``), and nothing in the code loss asks the
hidden state for that. This head asks for it directly: two linear read-outs of that hidden state
name the colour and the shape of the object drawn over cell ``k`` (or "background", a class of its
own in each), each on its own softmax. As for answers (:mod:`evotok.mllm.answer_gaps`), the classes
that would only teach a co-occurrence gap are left out: a red object's shape softmax leaves out the
shapes red is never seen with, so the head is not taught that a red star cannot exist.

The head is used in training only (``train.cell_attribute_weight``); sampling never reads it.
Tried on the bundled model's scale (``training/configs/mllm_cell_attributes.yaml``, one CPU stage),
it did not move drawing: the loss was easy on seen pairs (the states already carried both), and on
held-out pairs the read-outs still name the shape less often (0.61 against 0.80). The read-outs
stay useful as a measurement (``training/bench_drawing_likelihood.py`` reports them).
"""
from __future__ import annotations

from typing import Collection, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.scenes import COLOURS, SHAPES, TRAIN_PAIRS, SceneObject
from .layout_plan import centre_cell

__all__ = ["cell_labels", "cell_attribute_targets", "object_cells", "gap_class_mask", "CellAttributeHead",
           "IGNORE_CELL"]

IGNORE_CELL = -100  # a cell with no target (a drawing from a source without scene objects)
COLOUR_BACKGROUND = len(COLOURS)  # the "background" class of the colour read-out
SHAPE_BACKGROUND = len(SHAPES)


def cell_labels(objects: Sequence[SceneObject], grid: int) -> dict[str, np.ndarray]:
    """Colour and shape index of the object covering each cell centre (-1: background); a later
    object is drawn on top of an earlier one."""
    return _labels(objects, [_centre_cells(obj, grid) for obj in objects], grid)


def cell_attribute_targets(objects: Sequence[SceneObject], grid: int) -> np.ndarray:
    """``2 × grid²`` class indices in raster order: row 0 the colour, row 1 the shape of the object
    over each cell, ``COLOUR_BACKGROUND`` / ``SHAPE_BACKGROUND`` on the background. An object too
    small to cover any cell centre labels the cell holding its own centre, unless another object
    covers that cell."""
    covered = [_centre_cells(obj, grid) for obj in objects]
    labels = _labels(objects, covered, grid)
    for obj, inside in zip(objects, covered):
        row, col = centre_cell(obj, grid)
        cell = row * grid + col
        if labels["shape"][cell] < 0 and not inside.any():
            labels["colour"][cell] = list(COLOURS).index(obj.colour)
            labels["shape"][cell] = list(SHAPES).index(obj.shape)
    colour = np.where(labels["colour"] < 0, COLOUR_BACKGROUND, labels["colour"])
    shape = np.where(labels["shape"] < 0, SHAPE_BACKGROUND, labels["shape"])
    return np.stack([colour, shape]).astype(np.int64)


def object_cells(obj: SceneObject, grid: int) -> np.ndarray:
    """``grid²`` booleans in raster order: the cells whose centre lies in the object's box; on a
    coarse grid a small object may cover no centre, and then the cell holding its own centre stands
    for it (the cells :func:`cell_attribute_targets` labels with a lone object)."""
    return cell_attribute_targets([obj], grid)[1] != SHAPE_BACKGROUND


def _centre_cells(obj: SceneObject, grid: int) -> np.ndarray:
    """The cells (raster order) whose centre lies in the object's drawn box."""
    centres = (np.arange(grid) + 0.5) / grid
    x0, y0, x1, y1 = obj.bbox
    return ((centres[None, :] >= x0) & (centres[None, :] <= x1) &
            (centres[:, None] >= y0) & (centres[:, None] <= y1)).reshape(-1)


def _labels(objects: Sequence[SceneObject], covered: Sequence[np.ndarray], grid: int) -> dict[str, np.ndarray]:
    labels = {"colour": np.full(grid * grid, -1), "shape": np.full(grid * grid, -1)}
    for obj, inside in zip(objects, covered):
        labels["colour"][inside] = list(COLOURS).index(obj.colour)
        labels["shape"][inside] = list(SHAPES).index(obj.shape)
    return labels


def gap_class_mask(pairs: Collection[tuple[str, str]] = frozenset(TRAIN_PAIRS)) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the classes to leave out, given the other attribute: ``colour_gaps[s, c]``
    is True where colour ``c`` is never seen with shape ``s`` in ``pairs``; ``shape_gaps[c, s]``
    where shape ``s`` is never seen with colour ``c``. Background classes are never left out."""
    colours, shapes = list(COLOURS), list(SHAPES)
    seen = torch.zeros(len(colours), len(shapes), dtype=torch.bool)
    for c, s in pairs:
        seen[colours.index(c), shapes.index(s)] = True
    colour_gaps = torch.zeros(len(shapes), len(colours) + 1, dtype=torch.bool)
    colour_gaps[:, :-1] = ~seen.T
    shape_gaps = torch.zeros(len(colours), len(shapes) + 1, dtype=torch.bool)
    shape_gaps[:, :-1] = ~seen
    return colour_gaps, shape_gaps


class CellAttributeHead(nn.Module):
    """Linear read-outs of a drawing hidden state: the colour and the shape of the cell it draws."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.colour = nn.Linear(hidden_size, len(COLOURS) + 1)
        self.shape = nn.Linear(hidden_size, len(SHAPES) + 1)
        for layer in (self.colour, self.shape):  # zero: no gradient reaches a trained trunk until the
            nn.init.zeros_(layer.weight)          # read-outs have learned something
            nn.init.zeros_(layer.bias)
        colour_gaps, shape_gaps = gap_class_mask()
        self.register_buffer("colour_gaps", colour_gaps, persistent=False)
        self.register_buffer("shape_gaps", shape_gaps, persistent=False)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``N × hidden`` -> (colour logits ``N × (colours + 1)``, shape logits ``N × (shapes + 1)``)."""
        return self.colour(states), self.shape(states)

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of the colour and shape cross-entropies over the cells with a target (``targets``:
        ``N × 2``, colour then shape; ``IGNORE_CELL`` rows are skipped), gap classes left out."""
        keep = targets[:, 0] != IGNORE_CELL
        if not bool(keep.any()):
            return states.sum() * 0.0
        colour_logits, shape_logits = (x.float() for x in self(states[keep]))
        colour, shape = targets[keep].unbind(1)
        on_object = (colour < COLOUR_BACKGROUND) & (shape < SHAPE_BACKGROUND)
        # gaps: a colour never seen with this cell's shape, a shape never seen with its colour
        colour_out = torch.zeros_like(colour_logits, dtype=torch.bool)
        shape_out = torch.zeros_like(shape_logits, dtype=torch.bool)
        colour_out[on_object] = self.colour_gaps[shape[on_object]]
        shape_out[on_object] = self.shape_gaps[colour[on_object]]
        colour_out[torch.arange(len(colour)), colour] = False  # never the target itself
        shape_out[torch.arange(len(shape)), shape] = False
        colour_loss = F.cross_entropy(colour_logits.masked_fill(colour_out, float("-inf")), colour)
        shape_loss = F.cross_entropy(shape_logits.masked_fill(shape_out, float("-inf")), shape)
        return (colour_loss + shape_loss) / 2
