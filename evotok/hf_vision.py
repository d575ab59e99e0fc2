"""Reading patch features out of any transformers vision tower (SigLIP, SigLIP2, CLIP, ViT, ...).

Shared by the trainable encoder (``encoders.HFVisionEncoder``) and the frozen teacher
(``teacher.HFVisionTeacher``), which both take the penultimate layer's patch tokens.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def vision_tower(model: nn.Module) -> nn.Module:
    """The module that owns embeddings + encoder: CLIP/SigLIP keep it under ``vision_model``."""
    tower = model
    for _ in range(3):
        inner = next((getattr(tower, a) for a in ("vision_model", "vision_tower", "visual")
                      if isinstance(getattr(tower, a, None), nn.Module)), None)
        if inner is None:
            break
        tower = inner
    return tower


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer blocks."""
    for owner in (getattr(tower, "encoder", None), tower):
        for name in ("layers", "layer"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) >= 2:
                return layers
    raise ValueError(f"{type(tower).__name__} has no list of transformer blocks (encoder.layers, layers, ...); "
                     "only ViT-style vision towers are supported (SigLIP, SigLIP2, CLIP, ViT, DINOv2, ...)")


@dataclass(frozen=True)
class TowerGeometry:
    patch_size: int
    grid_size: int     # patches per side
    image_size: int    # pixels per side the tower expects
    width: int         # hidden size
    naflex: bool       # SigLIP2 NaFlex: takes flattened patches plus their spatial shapes

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


def tower_geometry(tower: nn.Module, config: Any) -> TowerGeometry:
    """Patch size, grid and input size of ``tower`` from its (vision or full) transformers config.
    A NaFlex tower is used on a fixed square grid of ``num_patches`` patches."""
    vision = getattr(config, "vision_config", None) or config
    patch = int(vision.patch_size)
    naflex = "spatial_shapes" in inspect.signature(tower.forward).parameters
    if naflex:
        grid = math.isqrt(int(vision.num_patches))
        size = grid * patch
    else:
        raw = vision.image_size
        size = int(raw[0] if isinstance(raw, (list, tuple)) else raw)
        grid = size // patch
    return TowerGeometry(patch, grid, size, int(vision.hidden_size), naflex)


def penultimate_patch_features(tower: nn.Module, pixel_values: torch.Tensor, geometry: TowerGeometry) -> torch.Tensor:
    """Patch tokens of the second-to-last layer, ``b (grid grid) C``; class/register tokens dropped.

    ``pixel_values`` are normalised ``b 3 S S`` images at ``geometry.image_size``."""
    b, g, p = pixel_values.shape[0], geometry.grid_size, geometry.patch_size
    if geometry.naflex:
        # the SigLIP2 processor's layout: (rows, cols) of p×p×3 patches, channels last
        patches = pixel_values.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * 3)
        out = tower(pixel_values=patches,
                    pixel_attention_mask=torch.ones(b, g * g, dtype=torch.long, device=pixel_values.device),
                    spatial_shapes=torch.tensor([[g, g]] * b, device=pixel_values.device),
                    output_hidden_states=True)
    else:
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    extra = hidden.shape[1] - geometry.num_patches
    if extra < 0:
        raise ValueError(f"the vision tower gave {hidden.shape[1]} tokens for a {g}×{g} patch grid")
    return hidden[:, extra:]
