"""Losses and metrics against hand-computed values."""
import pytest
import torch
from torch import nn

from evotok.losses import (FeatureDistance, LossWeights, PatchDiscriminator, cosine_fold_loss,
                           hinge_discriminator_loss, hinge_generator_loss, reconstruction_loss,
                           sample_pixel_depths)
from evotok.metrics import BundledInception, fid_bundled, psnr, semantic_cosine, ssim


def test_cosine_fold_loss_hand_computed():
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert cosine_fold_loss(target, target, folds=2).item() == pytest.approx(0.0, abs=1e-6)
    # whole: cos = 1/2; fold 1 matches (cos 1), fold 2 is orthogonal (cos 0)
    prediction = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    expected = (1 - 0.5) + (1 - (1 + 0) / 2)
    assert cosine_fold_loss(prediction, target, folds=2).item() == pytest.approx(expected, abs=1e-6)
    assert cosine_fold_loss(prediction, target, folds=1).item() == pytest.approx(0.5, abs=1e-6)
    assert cosine_fold_loss(prediction * 3, target, folds=1).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        cosine_fold_loss(prediction, target, folds=3)


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)


def test_reconstruction_kinds():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert reconstruction_loss(a, b, "l2").item() == pytest.approx(0.25)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        reconstruction_loss(a, b, "l3")


def test_quantizer_dropout_depths():
    g = torch.Generator().manual_seed(0)
    depths = sample_pixel_depths(4000, pixel_depth=4, dropout_prob=0.5, generator=g)
    assert depths.min() == 1 and depths.max() == 4
    assert (depths == 4).float().mean().item() == pytest.approx(0.5 + 0.5 / 4, abs=0.03)
    assert torch.equal(sample_pixel_depths(5, 3, 0.0), torch.full((5,), 3))


def test_patch_discriminator_and_user_feature_distance():
    disc = PatchDiscriminator(channels=8, num_layers=2)
    logits = disc(torch.rand(2, 3, 32, 32))
    assert logits.ndim == 4 and logits.shape[:2] == (2, 1)

    class TwoMaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            first = self.a(x)
            return [first, self.b(first)]

    distance = FeatureDistance(TwoMaps())
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    assert distance(x, x.detach()).item() == pytest.approx(0.0, abs=1e-6)
    value = distance(x, torch.rand(2, 3, 16, 16))
    value.backward()
    assert value > 0 and x.grad is not None
    assert not any(p.requires_grad for p in distance.feature_net.parameters())
    assert LossWeights().gan_start_step == 20000


def test_psnr_ssim_cosine():
    a = torch.zeros(2, 3, 16, 16)
    b = a + 0.2  # mse 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim(img, img).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim(img, torch.rand_like(img) * 2 - 1) < 0.5).all()
    f = torch.randn(2, 5, 8)
    assert semantic_cosine(f, f).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert semantic_cosine(f, -f).tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)


def test_fid_bundled_inception():
    assert BundledInception()(torch.rand(2, 3, 64, 64)).shape == (2, 2048)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(10, 3, 64, 64, generator=g) * 2 - 1
    same = fid_bundled(real, real)
    different = fid_bundled(real, torch.zeros_like(real) - 0.8)
    assert abs(same) < 1e-2
    assert different > same + 10
