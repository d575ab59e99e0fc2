"""Images as the model reads its own drawings: decoded at the pixel depth, then encoded again.

A drawing holds only the pixel stages of each cell (``pixel_depth`` codes). To answer about it,
or to judge it among best-of-n candidates (``evotok.mllm.rerank``), it is decoded to pixels and
encoded again to the full depth whose semantic stages the model reads. That round trip changes
the codes even of a true render: on 80 held-out scenes, stage 24 kept 0.60 of the first-stage
codes, 0.20 of the second and under 0.08 of each later one, and it answers 0.830 of
``bench_mllm.py``'s 1,176 held-out scene questions after the round trip against 0.934 on the
renders themselves (shape questions 0.635 against 0.923). A model trained only on encoded renders
judges its drawings through a view it never learnt. ``read_back_rate`` (training) shows the
understanding path that view for a share of its images, with the same questions and answers;
stage 27 (``training/configs/mllm_read_back.yaml``) trained its projector alone that way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import EvoTokMLLM

__all__ = ["read_back_codes", "read_back_some"]


@torch.no_grad()
def read_back_codes(model: "EvoTokMLLM", codes: torch.Tensor) -> torch.Tensor:
    """Codes ``b h w L`` (L >= the pixel depth; deeper stages are ignored) decoded at the pixel
    depth and encoded again: full-depth codes ``b h w D``. In full precision even under mixed
    precision training, so that training sees the codes inference reads."""
    depth = model.config.pixel_depth
    if codes.shape[-1] < depth:
        raise ValueError(f"codes have {codes.shape[-1]} stages; reading them back needs the {depth} pixel stages")
    with torch.autocast(codes.device.type, enabled=False):
        return model.encode_images(model.decode_codes(codes[..., :depth]).clamp(-1, 1))


def read_back_some(model: "EvoTokMLLM", image_codes: torch.Tensor, rate: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``image_codes`` (``b h w D``) with each image, with probability ``rate``, read back
    (:func:`read_back_codes`); the others are left as they are."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the read-back rate must lie in [0, 1], got {rate}")
    chosen = torch.rand(image_codes.shape[0], generator=generator, device=image_codes.device) < rate
    if not bool(chosen.any()):
        return image_codes
    out = image_codes.clone()
    out[chosen] = read_back_codes(model, image_codes[chosen]).to(out.device, out.dtype)
    return out
