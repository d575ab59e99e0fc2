"""Image encoders: pixels ``b 3 H W`` -> latents ``b h w d`` ready for the quantizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from .config import EvoTokConfig
from .hf_vision import penultimate_patch_features, tower_geometry, vision_tower


def tanh_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear–Tanh–Linear, the bridge used between feature spaces throughout EvoTok."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


class ConvEncoder(nn.Module):
    """diffusers' VAE encoder trained from scratch; ``len(channels) - 1`` halvings."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        self.net = Encoder(
            in_channels=3, out_channels=config.code_dim,
            down_block_types=("DownEncoderBlock2D",) * len(config.channels),
            block_out_channels=config.channels, layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups, double_z=False,
            mid_block_add_attention=config.mid_block_attention,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).permute(0, 2, 3, 1)


def build_hf_vision_model(config: EvoTokConfig, load_weights: bool) -> nn.Module:
    """The vision tower of a transformers model, from its saved config or (for training) its weights."""
    from transformers import AutoConfig, AutoModel

    if load_weights or config.encoder_hf_config is None:
        hf_config = AutoConfig.from_pretrained(config.encoder_name_or_path)
        config.encoder_hf_config = hf_config.to_dict()
    hf_config = AutoConfig.for_model(**config.encoder_hf_config)
    if load_weights:
        model = AutoModel.from_pretrained(config.encoder_name_or_path)
    else:
        model = AutoModel.from_config(hf_config)
    return vision_tower(model)


class HFVisionEncoder(nn.Module):
    """Any transformers vision model; penultimate patch features -> Linear–Tanh–Linear -> ``d``.

    Images in ``[-1, 1]`` go in unchanged: that is SigLIP's and SigLIP2's normalisation
    (mean = std = 0.5); the tower is fine-tuned, so other families adapt to it.
    """

    def __init__(self, config: EvoTokConfig, load_weights: bool = False):
        super().__init__()
        from transformers import AutoConfig

        self.backbone = build_hf_vision_model(config, load_weights)
        self.geometry = tower_geometry(self.backbone, AutoConfig.for_model(**config.encoder_hf_config))
        if self.geometry.grid_size != config.grid_size:
            raise ValueError(f"the vision tower has a {self.geometry.grid_size}×{self.geometry.grid_size} patch grid "
                             f"but the tokenizer's grid is {config.grid_size}×{config.grid_size}")
        self.image_size = self.geometry.image_size
        self.grid = config.grid_size
        self.proj = tanh_mlp(self.geometry.width, self.geometry.width, config.code_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(-1, 1)
        feats = penultimate_patch_features(self.backbone, images, self.geometry)
        b = feats.shape[0]
        return self.proj(feats).reshape(b, self.grid, self.grid, -1)


def build_encoder(config: EvoTokConfig, load_pretrained: bool = False) -> nn.Module:
    if config.encoder == "conv":
        return ConvEncoder(config)
    return HFVisionEncoder(config, load_weights=load_pretrained)
