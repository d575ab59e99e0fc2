"""Per-stage analysis: how pixels and semantics evolve along the residual chain."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .metrics import psnr, semantic_cosine, ssim


@dataclass
class DepthReport:
    """Mean figures of a batch of images after each quantizer depth 1..D."""

    depths: list[int]
    psnr: list[float]
    ssim: list[float]
    semantic_cosine: list[float] | None
    residual_norm: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_depths(tokenizer, images: torch.Tensor, teacher=None, depths: list[int] | None = None,
                    batch_size: int = 64) -> DepthReport:
    """PSNR/SSIM of the pixel decoder and cosine of the semantic decoder to the teacher, per depth."""
    depths = depths or list(range(1, tokenizer.config.num_stages + 1))
    sums = {k: torch.zeros(len(depths)) for k in ("psnr", "ssim", "cos", "res")}
    count = 0
    for chunk in images.split(batch_size):
        latents = tokenizer.encoder(chunk)
        codes = tokenizer.quantizer(latents, update=False).codes
        recons = tokenizer.decode_all_depths(codes, depths)
        target = teacher.image_features(chunk) if teacher is not None else None
        for i, depth in enumerate(depths):
            sums["psnr"][i] += psnr(recons[i], chunk).sum()
            sums["ssim"][i] += ssim(recons[i], chunk).sum()
            residual = latents - tokenizer.quantizer.codes_to_latent(codes, depth)
            sums["res"][i] += residual.flatten(1).norm(dim=1).sum()
            if target is not None:
                sums["cos"][i] += semantic_cosine(tokenizer.semantic_features(codes, depth), target).sum()
        count += chunk.shape[0]
    mean = {k: (v / max(count, 1)).tolist() for k, v in sums.items()}
    return DepthReport(depths=depths, psnr=mean["psnr"], ssim=mean["ssim"],
                       semantic_cosine=mean["cos"] if teacher is not None else None, residual_norm=mean["res"])
