"""Two-dimensional rotary positions for grid cells inside a one-dimensional LM (M-RoPE style).

A transformers LM rotates queries and keys by one sequence index per token. In raster order a
grid row is a run of ``grid`` neighbouring indices, but a column is every ``grid``-th index, so
the column is the sequence index modulo ``grid``: a small LM fitted on "left or right of the
middle" questions learned the row and hardly the column (``training/bench_position_probe.py``).

Here each token carries three position streams:

* text: all three equal its sequence index, which is exactly the LM's own rotary embedding;
* a grid cell (image placeholder or generated cell) at row ``r``, column ``c`` of a block whose
  first cell sits at sequence index ``s``: ``(s + g·r + c, s + k·r, s + k·c)``, i.e. the sequence
  index unchanged, then its row and its column counted from the block's start, ``k`` apart
  (``stride``; 1 as in Qwen2-VL; ``g`` spreads a column over as many positions as the sequence
  index spreads a row).

The rotary frequencies are dealt out to the streams in turn (frequency ``i`` reads stream
``i mod 3``, as in Qwen3-VL's interleaved M-RoPE), so every stream gets fast and slow frequencies.
Only the rotary embedding module is wrapped: any transformers LM whose base model has a
``rotary_emb(x, position_ids) -> (cos, sin)`` module can take it (Qwen2/2.5/3, Llama and Mistral
have one; the tests use Qwen2), at any size, and the LM's weights are untouched.

In stage 8 of the bundled model this did not make the column readable: the image cells held row and
column alike, and the answer read only the row. Stages 9-11, trained on more data in larger batches
with nothing else changed, read it (0.853 on left-or-right place questions; ``assets/mllm/README.md``,
Limits).
"""
from __future__ import annotations

import torch
from torch import nn

STREAMS = 3  # sequence index, row, column


def cell_index_of(cell_mask: torch.Tensor, num_cells: int) -> torch.Tensor:
    """``B L`` index of each grid cell within its image (0 … ``num_cells``-1, raster order), -1 on
    text. Cells come in whole consecutive blocks of ``num_cells``, as the chat encoding lays them."""
    counts = cell_mask.long().cumsum(-1) - 1
    return torch.where(cell_mask.bool(), counts % num_cells, torch.full_like(counts, -1))


def grid_position_ids(positions: torch.Tensor, cell_index: torch.Tensor | None, grid_size: int,
                      stride: int = 1) -> torch.Tensor:
    """``3 B L`` position streams from ``B L`` sequence positions and cell indices (-1: text);
    ``stride``: how far apart neighbouring rows (columns) sit in the row (column) stream."""
    if cell_index is None:
        cell_index = torch.full_like(positions, -1)
    positions = positions.expand_as(cell_index)
    cell = cell_index.clamp_min(0)
    start = positions - cell  # the block's first cell (cells are consecutive)
    is_cell = cell_index >= 0
    rows = torch.where(is_cell, start + stride * (cell // grid_size), positions)
    cols = torch.where(is_cell, start + stride * (cell % grid_size), positions)
    return torch.stack([positions, rows, cols])


class GridRotaryEmbedding(nn.Module):
    """Wraps an LM's rotary embedding: ``B L`` position ids pass through unchanged; ``3 B L``
    streams give each rotary frequency the stream ``frequency mod 3``."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim == 2:
            return self.rotary(x, position_ids)
        if position_ids.shape[0] != STREAMS:
            raise ValueError(f"grid position ids must be {STREAMS}×B×L, got {tuple(position_ids.shape)}")
        b, length = position_ids.shape[1:]
        cos, sin = self.rotary(x, position_ids.flatten(0, 1))  # 3B L head_dim, halves repeated
        dim = cos.shape[-1]
        stream = (torch.arange(dim, device=cos.device) % (dim // 2)) % STREAMS
        index = stream.view(1, 1, 1, dim).expand(1, b, length, dim)
        pick = lambda t: t.view(STREAMS, b, length, dim).gather(0, index)[0]  # noqa: E731
        return pick(cos), pick(sin)


def install_grid_rope(lm: nn.Module) -> None:
    """Wrap ``lm``'s rotary embedding (idempotent); raises if the LM has none to wrap."""
    base = lm.base_model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(base).__name__} has no rotary_emb module: grid rotary positions need an LM "
                         f"with rotary position embeddings (Qwen2, Llama, Mistral, …)")
    if not isinstance(rotary, GridRotaryEmbedding):
        base.rotary_emb = GridRotaryEmbedding(rotary)
