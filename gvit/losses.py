"""Reconstruction losses and image-quality metrics.

Images are ``[B, C, H, W]`` with values in [0, 1] (data range 1). Losses return a scalar
(mean over the batch); metrics return one value per image, ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_C1, _C2 = 0.01**2, 0.03**2


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(pred.shape)}")


def mse(pred: Tensor, target: Tensor) -> Tensor:
    _check_pair(pred, target)
    return F.mse_loss(pred, target)


def l1(pred: Tensor, target: Tensor) -> Tensor:
    _check_pair(pred, target)
    return F.l1_loss(pred, target)


def bce(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Binary cross-entropy of a rendered image against the target, the rendering clamped to
    [eps, 1 - eps] (alpha compositing can exceed 1 with a bright background). Computed in float32
    outside autocast, which refuses it (log of a half-precision probability loses the loss)."""
    _check_pair(pred, target)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    with torch.autocast(pred.device.type, enabled=False):
        return F.binary_cross_entropy(pred.to(dtype).clamp(eps, 1 - eps), target.to(dtype).clamp(0, 1))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype).expand(channels, 1, size, size).contiguous()


def ssim_map(pred: Tensor, target: Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-pixel SSIM ``[B, C, H, W]`` with a Gaussian window (11x11, sigma 1.5) and zero padding
    at the borders, as in 3D Gaussian splatting's loss."""
    _check_pair(pred, target)
    ch = pred.shape[1]
    w = _gaussian_window(window_size, sigma, ch, pred.device, pred.dtype)
    pad = window_size // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, w, padding=pad, groups=ch)

    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x.square()
    syy = blur(target * target) - mu_y.square()
    sxy = blur(pred * target) - mu_x * mu_y
    return ((2 * mu_x * mu_y + _C1) * (2 * sxy + _C2)) / ((mu_x.square() + mu_y.square() + _C1) * (sxx + syy + _C2))


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM per image, ``[B]``."""
    return ssim_map(pred, target).flatten(1).mean(1)


def dssim(pred: Tensor, target: Tensor) -> Tensor:
    """D-SSIM loss, 1 - SSIM averaged over the batch (3D Gaussian splatting's form)."""
    return 1.0 - ssim(pred, target).mean()


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``[B]``, for data range 1 (pred clamped to [0, 1])."""
    _check_pair(pred, target)
    err = (pred.clamp(0, 1) - target).square().flatten(1).mean(1)
    return -10.0 * torch.log10(err.clamp_min(1e-12))


RECONSTRUCTION_LOSSES = {"mse": mse, "bce": bce, "l1": l1}


def reconstruction_loss(pred: Tensor, target: Tensor, kind: str = "mse", dssim_weight: float = 0.0) -> Tensor:
    """Pixel loss (``"mse"``, ``"bce"`` or ``"l1"``) plus ``dssim_weight`` * D-SSIM."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"loss: expected one of {sorted(RECONSTRUCTION_LOSSES)}, got {kind!r}")
    loss = RECONSTRUCTION_LOSSES[kind](pred, target)
    if dssim_weight:
        loss = loss + dssim_weight * dssim(pred, target)
    return loss
