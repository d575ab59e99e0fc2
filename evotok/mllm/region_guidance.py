"""Region guidance: each planned object guides the drawing of the cells its plan gives it.

A model that writes layout plans (:mod:`evotok.mllm.layout_plan`) gets the count, the binding and
the places right in text, and then draws as if it had no plan: teacher-forced, the cells already
drawn tell where an object is, so its training loss hardly asks it to read the plan's place. Region
guidance uses the plan at sampling time instead, as layout-grounded samplers of diffusion models do.
Each planned object gets a guidance branch of its own, the prompt cut down to that object ("a red
star") followed by its single plan entry; the cells the entry covers (an object of its size centred
on its cell, :func:`evotok.mllm.cell_attributes.object_cells`) mix their logits as

    u + g (c − u) + r (o_i − u)

where ``u`` is the unconditional branch, ``c`` the prompt with its whole plan, ``o_i`` the branch of
the object planned over the cell, ``g`` the guidance scale and ``r`` the region guidance. Every other
cell mixes ``u + g (c − u)``, plain guidance. All branches receive the same sampled codes, so each
object branch sees the whole drawing so far. Where planned objects overlap, the later one (drawn on
top in the scene world) guides the cell. A plan that does not parse guides nothing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.scenes import SceneObject
from .cell_attributes import object_cells
from .layout_plan import PlannedObject
from .prompt_parts import fix_articles

__all__ = ["object_prompt", "planned_cells", "region_weights", "RegionMix"]


def object_prompt(planned: PlannedObject) -> str:
    """The prompt of one planned object's branch: "a red star", "an orange cross"."""
    return fix_articles(f"a {planned.colour} {planned.shape}")


def planned_cells(planned: PlannedObject, grid: int) -> np.ndarray:
    """``grid²`` booleans in raster order: the cells an object of the entry's size covers when
    centred on the entry's cell."""
    centre = ((planned.col + 0.5) / grid, (planned.row + 0.5) / grid)
    return object_cells(SceneObject(planned.shape, planned.colour, planned.size, centre), grid)


def region_weights(plans: Sequence[Sequence[PlannedObject]], grid: int) -> torch.Tensor:
    """``b × grid² × m`` (``m``: the most entries in a plan): 1 where entry ``i`` of image ``j``'s
    plan guides cell ``k``, else 0; each cell is guided by at most one entry, the last that covers it."""
    m = max((len(p) for p in plans), default=0)
    weights = torch.zeros(len(plans), grid * grid, m)
    for j, plan in enumerate(plans):
        owner = np.full(grid * grid, -1)
        for i, planned in enumerate(plan):
            owner[planned_cells(planned, grid)] = i
        cells = np.flatnonzero(owner >= 0)
        weights[j, torch.from_numpy(cells), torch.from_numpy(owner[cells])] = 1.0
    return weights


class RegionMix:
    """Mixes the logits of ``(2 + m) · b`` rows, in the order: the prompts with their plans, the
    ``m`` object branches, the unconditional branch, into one row per image for cell ``cell``."""

    def __init__(self, b: int, guidance_scale: float, region_guidance: float, weights: torch.Tensor):
        if weights.shape[0] != b:
            raise ValueError(f"region weights for {weights.shape[0]} images, {b} prompts")
        self.b, self.guidance_scale, self.region_guidance = b, guidance_scale, region_guidance
        self.weights = weights
        self.branches = 2 + weights.shape[-1]

    def __call__(self, logits: torch.Tensor, cell: int) -> torch.Tensor:
        rows = logits.float().split(self.b)
        cond, objects, uncond = rows[0], rows[1:-1], rows[-1]
        mixed = uncond + self.guidance_scale * (cond - uncond)
        weights = self.weights[:, cell].to(mixed.device)  # b × m
        for i, branch in enumerate(objects):
            mixed = mixed + self.region_guidance * weights[:, i, None] * (branch - uncond)
        return mixed
