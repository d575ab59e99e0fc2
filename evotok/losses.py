"""Training objectives of the tokenizer: pixels, adversarial, perceptual, commitment, semantics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss must be 'l2' or 'l1', got {kind!r}")


def sample_pixel_depths(batch: int, pixel_depth: int, dropout_prob: float, max_depth: int | None = None,
                        generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Quantizer dropout: each sample decodes from ``pixel_depth``, or with ``dropout_prob`` from a
    uniformly drawn depth in ``1..max_depth`` so every prefix becomes a trained decode."""
    max_depth = max_depth or pixel_depth
    depths = torch.full((batch,), pixel_depth, dtype=torch.long)
    if dropout_prob > 0:
        drop = torch.rand(batch, generator=generator) < dropout_prob
        random_depths = torch.randint(1, max_depth + 1, (batch,), generator=generator)
        depths = torch.where(drop, random_depths, depths)
    return depths.to(device)


def cosine_fold_loss(prediction: torch.Tensor, target: torch.Tensor, folds: int = 4) -> torch.Tensor:
    """``1 - cos`` on whole feature vectors plus ``1 - cos`` averaged over ``folds`` equal chunks.

    The chunked term stops a few large channels from dominating the direction match.
    """
    prediction, target = prediction.float(), target.float()
    whole = 1 - F.cosine_similarity(prediction, target, dim=-1).mean()
    if folds <= 1:
        return whole
    if prediction.shape[-1] % folds:
        raise ValueError(f"feature width {prediction.shape[-1]} is not divisible by folds={folds}")
    chunked = 1 - F.cosine_similarity(prediction.unflatten(-1, (folds, -1)),
                                      target.unflatten(-1, (folds, -1)), dim=-1).mean()
    return whole + chunked


def readout_loss(teacher, prediction: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between the teacher's image embedding of predicted patch features and of the real
    ones (``target_embeds``, precomputed without gradient).

    Patch-wise cosine alone reached 0.98 on the bundled tokenizer (phase 1) while the teacher's head, reading
    the prediction, named the shape of a held-out scene 72% of the time against 91% on the real
    features: regression smooths away the peaks that its max pooling reads. This term keeps them.
    """
    return 1 - (teacher.readout(prediction) * target_embeds.to(prediction.device)).sum(-1).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided convolutions giving one real/fake logit per overlapping image patch."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class FeatureDistance(nn.Module):
    """Perceptual loss from a feature network the *user supplies* (no pretrained one ships offline).

    ``feature_net(images)`` must return a list of feature maps; the loss is the mean squared
    difference of channel-normalised features, summed over maps (LPIPS without learned weights).
    The network is frozen and run without gradients to its parameters.
    """

    def __init__(self, feature_net: nn.Module):
        super().__init__()
        self.feature_net = feature_net.eval().requires_grad_(False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self.feature_net(target)
        total = reconstruction.new_zeros(())
        for fake, real in zip(self.feature_net(reconstruction), target_feats):
            total = total + (_unit(fake.float()) - _unit(real.float())).pow(2).sum(1).mean()
        return total

    def train(self, mode: bool = True) -> "FeatureDistance":
        super().train(mode)
        self.feature_net.eval()
        return self


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


@dataclass
class LossWeights:
    """Weights of the generator objective (reference values from DESIGN.md §1)."""

    reconstruction: float = 1.0
    reconstruction_kind: str = "l2"
    perceptual: float = 0.0
    gan: float = 0.5
    gan_start_step: int = 20000
    commitment: float = 0.25
    semantic: float = 1.0
    semantic_folds: int = 4


def generator_loss(output, images: torch.Tensor, teacher_features: torch.Tensor | None, weights: LossWeights,
                   step: int, discriminator: nn.Module | None = None,
                   perceptual: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The tokenizer's total loss and its terms (each term detached for logging)."""
    terms: dict[str, torch.Tensor] = {
        "reconstruction": reconstruction_loss(output.reconstruction.float(), images.float(), weights.reconstruction_kind),
        "commitment": output.commitment_loss,
    }
    total = weights.reconstruction * terms["reconstruction"] + weights.commitment * terms["commitment"]
    if teacher_features is not None and weights.semantic > 0:
        terms["semantic"] = cosine_fold_loss(output.semantic_features, teacher_features, weights.semantic_folds)
        total = total + weights.semantic * terms["semantic"]
    if perceptual is not None and weights.perceptual > 0:
        terms["perceptual"] = perceptual(output.reconstruction, images)
        total = total + weights.perceptual * terms["perceptual"]
    if discriminator is not None and weights.gan > 0 and step >= weights.gan_start_step:
        terms["gan"] = hinge_generator_loss(discriminator(output.reconstruction))
        total = total + weights.gan * terms["gan"]
    terms["total"] = total
    return total, {k: v.detach() for k, v in terms.items()}
