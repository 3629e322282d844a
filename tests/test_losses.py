import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from gvit.losses import bce, dssim, mse, psnr, reconstruction_loss, ssim, ssim_map


def _pair(b=2, c=3, h=24, w=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    pred = (target + 0.1 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return pred, target


def test_ssim_matches_scikit_image_away_from_borders():
    pred, target = _pair()
    ours = ssim_map(pred, target)
    for b in range(2):
        _, ref = structural_similarity(pred[b].numpy(), target[b].numpy(), channel_axis=0, data_range=1.0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
        # scikit-image pads by reflection, we by zeros (as 3DGS does): compare the interior
        assert np.allclose(ours[b, :, 5:-5, 5:-5].numpy(), ref[:, 5:-5, 5:-5], atol=1e-10)


def test_ssim_and_dssim_basic_properties():
    pred, target = _pair()
    assert torch.allclose(ssim(target, target), torch.ones(2, dtype=torch.float64))
    s = ssim(pred, target)
    assert s.shape == (2,) and (s < 1).all()
    assert torch.isclose(dssim(pred, target), 1 - s.mean())


def test_psnr_against_formula():
    pred, target = _pair()
    mse_np = ((pred - target) ** 2).flatten(1).mean(1).numpy()
    assert np.allclose(psnr(pred, target).numpy(), 10 * np.log10(1 / mse_np))
    assert (psnr(target, target) > 100).all()


def test_mse_and_bce():
    pred, target = _pair()
    assert torch.isclose(mse(pred, target), ((pred - target) ** 2).mean())
    extreme = torch.zeros_like(target)
    extreme[..., ::2] = 1.0
    value = bce(extreme, target)
    assert torch.isfinite(value)
    p = pred.clamp(1e-6, 1 - 1e-6)
    assert torch.isclose(bce(pred, target), -(target * p.log() + (1 - target) * (1 - p).log()).mean())


def test_losses_are_differentiable():
    pred, target = _pair()
    pred.requires_grad_()
    reconstruction_loss(pred, target, "bce", dssim_weight=0.1).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_bad_inputs():
    pred, target = _pair()
    with pytest.raises(ValueError, match="same shape"):
        mse(pred, target[:, :2])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        psnr(pred[0], target[0])
    with pytest.raises(ValueError, match="loss"):
        reconstruction_loss(pred, target, "l3")
