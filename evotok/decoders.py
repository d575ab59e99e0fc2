"""The two read-outs of the residual chain: pixels from a short prefix, semantics from a long one."""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from .config import EvoTokConfig
from .encoders import tanh_mlp


class PixelDecoder(nn.Module):
    """diffusers' VAE decoder: ``b h w d`` latents -> ``b 3 H W`` images (unbounded; clamp to show)."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        self.net = Decoder(
            in_channels=config.code_dim, out_channels=3,
            up_block_types=("UpDecoderBlock2D",) * len(config.channels),
            block_out_channels=config.channels, layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups, mid_block_add_attention=config.mid_block_attention,
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents.permute(0, 3, 1, 2).contiguous())


class SemanticDecoder(nn.Module):
    """A small transformer over the token grid regressing the teacher's patch features.

    ``b h w d`` -> ``b (h w) teacher_dim``. Learned position embeddings give the grid its layout.
    """

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        width = config.semantic_width
        self.embed = nn.Linear(config.code_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, config.grid_size ** 2, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, config.semantic_heads, 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.semantic_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = tanh_mlp(width, width, config.teacher_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(latents.flatten(1, 2)) + self.pos
        return self.head(self.norm(self.blocks(tokens)))
