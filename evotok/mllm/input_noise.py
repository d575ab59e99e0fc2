"""Noisy drawn cells as inputs while training, so that the prompt and the plan must carry more.

Teacher-forced, the hidden state that draws a cell sees every true cell before it, and the cells
already drawn say most of what comes next: where an object is, its colour, its shape. A model
trained that way learns to continue the drawing and to leave the prompt and its layout plan
mostly unread (``training/bench_drawing_likelihood.py``: moving the planned object half the grid
away costs stages 16 and 17 only 0.02 to 0.07 nats per object cell). Replacing a share of the
input cells with other cells' codes, while the targets stay true, makes the drawing so far less
reliable than the text, much as dropout or scheduled sampling do. Sampling never adds noise.
At 15% on stage 18 ("stage 19", ``training/configs/mllm_input_noise.yaml``) the drawings followed
the plan more (an object at 0.41 of the held-out planned cells, against 0.34), and every cell of a
clean drawing cost more than before: training on noisy inputs and sampling clean ones do not match.
"""
from __future__ import annotations

import torch

__all__ = ["swap_cells"]


def swap_cells(codes: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``codes`` (``b h w L``) where each cell, with probability ``rate``, holds all the
    codes of a cell drawn at random from the whole batch (so every input stays a real cell)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the noise rate must lie in [0, 1], got {rate}")
    flat = codes.reshape(-1, codes.shape[-1]).clone()
    swapped = torch.rand(flat.shape[0], generator=generator, device=codes.device) < rate
    donors = torch.randint(flat.shape[0], (int(swapped.sum()),), generator=generator, device=codes.device)
    flat[swapped] = flat[donors]
    return flat.view_as(codes)
