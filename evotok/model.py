"""The EvoTok tokenizer: encoder -> residual quantizer -> pixel decoder (short prefix)
and semantic decoder (long prefix), saved and loaded like any Hugging Face model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import EvoTokConfig
from .decoders import PixelDecoder, SemanticDecoder
from .encoders import build_encoder
from .hub import PretrainedMixin
from .quantizer import ResidualQuantizer


@dataclass
class EvoTokOutput:
    """What one training forward pass produces (shapes: b batch, h w grid, D stages)."""

    reconstruction: torch.Tensor      # b 3 H W, pixel decoder on the (per-sample) pixel prefix
    semantic_features: torch.Tensor   # b (h w) C, semantic decoder on the semantic prefix
    codes: torch.Tensor               # b h w D
    commitment_loss: torch.Tensor     # scalar, averaged over all prefixes
    pixel_depths: torch.Tensor        # b, the prefix depth each reconstruction was decoded from
    residual_norms: torch.Tensor      # D, mean residual norm after each stage


class EvoTok(nn.Module, PretrainedMixin):
    """A unified image tokenizer reading two depths of one residual code.

    >>> tok = EvoTok(small_config())
    >>> codes = tok.encode(images)                      # b 3 H W in [-1, 1] -> b h w D
    >>> recon = tok.decode(codes, depth=tok.config.pixel_depth)
    >>> feats = tok.semantic_features(codes, depth=tok.config.semantic_depth)
    """

    config_class = EvoTokConfig
    model_type = "evotok"

    def __init__(self, config: EvoTokConfig, load_pretrained_encoder: bool = False):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config, load_pretrained=load_pretrained_encoder)
        self.quantizer = ResidualQuantizer(
            num_stages=config.num_stages, codebook_size=config.codebook_size, dim=config.code_dim,
            decay=config.decay, eps=config.eps, dead_threshold=config.dead_threshold,
            restart_every=config.restart_every,
        )
        self.pixel_decoder = PixelDecoder(config)
        self.semantic_decoder = SemanticDecoder(config)

    # ----------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, pixel_depths: torch.Tensor | int | None = None) -> EvoTokOutput:
        """Encode, quantize (updating codebooks by EMA in training mode) and decode both branches.

        ``pixel_depths`` (one int or one per sample) lets the pixel decoder learn shallower
        prefixes too (quantizer dropout); by default every sample uses ``config.pixel_depth``.
        """
        self._check_images(images)
        latents = self.encoder(images)
        quantized = self.quantizer(latents)
        if pixel_depths is None:
            pixel_depths = self.config.pixel_depth
        if isinstance(pixel_depths, int):
            pixel_depths = torch.full((images.shape[0],), pixel_depths, device=images.device)
        pixel_latents = self.quantizer.straight_through(latents, quantized.prefix_sums, pixel_depths)
        semantic_latents = self.quantizer.straight_through(latents, quantized.prefix_sums, self.config.semantic_depth)
        return EvoTokOutput(
            reconstruction=self.pixel_decoder(pixel_latents),
            semantic_features=self.semantic_decoder(semantic_latents),
            codes=quantized.codes,
            commitment_loss=quantized.commitment_loss,
            pixel_depths=pixel_depths,
            residual_norms=quantized.residual_norms,
        )

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``b 3 H W`` in [-1, 1] -> codes ``b h w D`` (never updates the codebooks)."""
        self._check_images(images)
        latents = self.encoder(images)
        return self.quantizer(latents, update=False).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Pixel decoder on the prefix of ``depth`` stages -> ``b 3 H W`` in [-1, 1]."""
        latents = self.quantizer.codes_to_latent(self._check_codes(codes), self._depth(depth, self.config.pixel_depth))
        return self.pixel_decoder(latents).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, depth: int | None = None, batch_size: int = 32) -> torch.Tensor:
        """``encode`` then ``decode`` at ``depth`` (default the pixel depth), ``batch_size`` images at
        a time: the best a generator writing this tokenizer's codes can draw."""
        return torch.cat([self.decode(self.encode(chunk), depth) for chunk in images.split(batch_size)])

    @torch.no_grad()
    def decode_all_depths(self, codes: torch.Tensor, depths: list[int] | None = None) -> torch.Tensor:
        """Reconstructions after each depth in one batched decoder pass -> ``len(depths) b 3 H W``."""
        codes = self._check_codes(codes)
        depths = depths or list(range(1, self.config.num_stages + 1))
        latents = torch.cat([self.quantizer.codes_to_latent(codes, self._depth(d, d)) for d in depths])
        images = self.pixel_decoder(latents).clamp(-1, 1)
        return images.reshape(len(depths), codes.shape[0], *images.shape[1:])

    @torch.no_grad()
    def semantic_features(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Semantic decoder on the prefix of ``depth`` stages -> ``b (h w) C`` teacher-space features."""
        latents = self.quantizer.codes_to_latent(self._check_codes(codes), self._depth(depth, self.config.semantic_depth))
        return self.semantic_decoder(latents)

    # ------------------------------------------------------------------ checks
    def _depth(self, depth: int | None, default: int) -> int:
        depth = default if depth is None else int(depth)
        if not 1 <= depth <= self.config.num_stages:
            raise ValueError(f"depth must lie in 1..{self.config.num_stages}, got {depth}")
        return depth

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"expected images of shape b×3×{size}×{size} in [-1, 1], got {tuple(images.shape)}; "
                             "resize with evotok.images.pil_to_tensor")

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        grid, stages = self.config.grid_size, self.config.num_stages
        if codes.ndim != 4 or codes.shape[1:3] != (grid, grid) or codes.shape[3] > stages:
            raise ValueError(f"expected codes of shape b×{grid}×{grid}×(≤{stages}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32) or (codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size)):
            raise ValueError(f"codes must be integers in 0..{self.config.codebook_size - 1}")
        return codes.long()
