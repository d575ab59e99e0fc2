"""More weight in the drawing loss on the cells where each object begins.

Teacher-forced, most drawn cells are easy to predict from the cells drawn before them: once an
object's top row is on the grid, the rows under it follow. The cells where the prompt and the
layout plan matter most are the ones where an object first appears in raster order: nothing
drawn yet says that an object starts there, nor which. Averaged over all 64 cells, the code loss
hardly asks for this. Stages 16 and 17 wrote correct plans and drew as if they had none: moving
the planned object half the grid away cost them only 0.02 to 0.07 nats per object cell
(``training/bench_drawing_likelihood.py``).

:func:`onset_weights` gives the cells of each object's first covered row ``weight`` times the
weight of the other cells, and the model's code loss becomes the weighted mean
(``EvoTokMLLM.forward(cell_weights=...)``, ``data.onset_weight`` in ``training/train_mllm.py``).
At weight 8 on stage 17 ("stage 18", ``training/configs/mllm_onset_weights.yaml``) a moved plan
cost 0.42 nats per onset cell instead of 0.12, and the drawings put an object at the planned cell
for 0.34 of the held-out plan entries instead of 0.25 (the model card has the rest).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.scenes import SceneObject
from .cell_attributes import object_cells

__all__ = ["onset_cells", "onset_weights"]


def onset_cells(objects: Sequence[SceneObject], grid: int) -> np.ndarray:
    """``grid²`` booleans in raster order: for each object, the cells of its first (top) row of
    :func:`object_cells`, where a raster-order drawing first meets it."""
    onset = np.zeros((grid, grid), dtype=bool)
    for obj in objects:
        cells = object_cells(obj, grid).reshape(grid, grid)
        top = int(np.argmax(cells.any(1)))
        onset[top] |= cells[top]
    return onset.reshape(-1)


def onset_weights(objects: Sequence[SceneObject], grid: int, weight: float) -> np.ndarray:
    """``grid²`` float32 loss weights in raster order: ``weight`` on :func:`onset_cells`, 1 elsewhere."""
    if weight <= 0:
        raise ValueError(f"the onset weight must be positive, got {weight}")
    return np.where(onset_cells(objects, grid), float(weight), 1.0).astype(np.float32)
