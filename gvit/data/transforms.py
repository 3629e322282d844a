"""Image transforms in torch: batched random resized crops (training augmentation) and square resizing;
and the same augmentation in Gaussian space (crops as the affine map of means and covariances, token
dropout, colour jitter, parameter noise) for models that read Gaussians.

Images are ``[B, C, H, W]`` float; every image of the batch gets its own random crop / flip from
the given generator, so a seeded generator makes a batch's augmentation reproducible.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gaussians import Gaussians, covariance, decode, encode

__all__ = ["crop_boxes", "resized_crop", "resize_square", "crop_gaussians", "gaussian_crop_boxes", "augment_gaussians",
           "augment_pairs"]


def crop_boxes(n: int, height: int, width: int, *, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
               generator: torch.Generator | None = None) -> Tensor:
    """Random boxes ``[n, 4]`` (x0, y0, w, h in pixels, float) covering ``scale`` of the image area
    with aspect ratio (w / h) log-uniform in ``ratio``, clipped to the image, uniform position."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    area = height * width * torch.empty(n, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(1, width)
    h = torch.sqrt(area / r).clamp(1, height)
    x0 = torch.rand(n, dtype=torch.float64, generator=generator) * (width - w)
    y0 = torch.rand(n, dtype=torch.float64, generator=generator) * (height - h)
    return torch.stack([x0, y0, w, h], -1)


def resized_crop(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear crops of ``boxes`` ``[B, 4]`` (x0, y0, w, h in pixels) resized to ``size`` (H, W).

    The output pixel centres are spread evenly over the box, so a box of the whole image at the
    same size returns the image unchanged.
    """
    b, _, h, w = images.shape
    oh, ow = size
    x0, y0, bw, bh = boxes.to(torch.float64).unbind(-1)
    # output pixel centre j -> x0 + (j + 0.5) * bw / ow (pixels) -> normalised (align_corners=False)
    u = (torch.arange(ow, dtype=torch.float64) + 0.5) / ow
    v = (torch.arange(oh, dtype=torch.float64) + 0.5) / oh
    gx = (x0[:, None] + u[None] * bw[:, None]) / w * 2 - 1  # [B, ow]
    gy = (y0[:, None] + v[None] * bh[:, None]) / h * 2 - 1  # [B, oh]
    grid = torch.stack([gx[:, None, :].expand(b, oh, ow), gy[:, :, None].expand(b, oh, ow)], -1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def resize_square(image: Tensor, size: int) -> Tensor:
    """``[C, H, W]`` -> ``[C, size, size]`` (antialiased bilinear, clamped to [0, 1]); unchanged when
    already that size. Non-square images are squashed, as models with one input size need."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


# --------------------------------------------------------------------------- augmentation in Gaussian space


def crop_gaussians(g: Gaussians, boxes: Tensor) -> Gaussians:
    """The Gaussians of each set as the crop ``boxes`` ``[B, 4]`` (x0, y0, x1, y1 in normalised coordinates)
    stretched to the whole image shows them: the affine map x -> (x - centre) / half-size of the box applied
    to means and covariances (Sigma' = D Sigma D, D = diag(1 / half-width, 1 / half-height); scales and
    angle read back from Sigma'). Rendering the result equals resampling the crop of the render (tested
    against a render at twice the size). Means may leave [-1, 1]; ``valid`` is kept."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    if (half <= 0).any():
        raise ValueError("crop_gaussians: every box needs x1 > x0 and y1 > y0")
    means = (g.means - centre[:, None]) / half[:, None]
    cov = covariance(g.scales, g.angles) / (half[:, None, :, None] * half[:, None, None, :])
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    mid, radius = (a + c) / 2, torch.sqrt(((a - c) / 2).square() + b.square())
    scales = torch.stack([mid + radius, (mid - radius).clamp_min(1e-20)], -1).sqrt()
    angles = 0.5 * torch.atan2(2 * b, a - c)  # the direction of the larger eigenvalue
    return replace(g, means=means, scales=scales, angles=angles)


def gaussian_crop_boxes(n: int, *, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> Tensor:
    """Random crop boxes ``[n, 4]`` (x0, y0, x1, y1, normalised) as :func:`crop_boxes` draws them for a
    square image: ``scale`` of the area, aspect ratio log-uniform in ``ratio``, uniform position."""
    x0, y0, w, h = (crop_boxes(n, 1024, 1024, scale=scale, ratio=ratio, generator=generator) / 512).unbind(-1)
    return torch.stack([x0 - 1, y0 - 1, x0 + w - 1, y0 + h - 1], -1).float()


def augment_pairs(images: Tensor | None, g: Gaussians, *, generator: torch.Generator, crop_scale_min: float = 1.0,
                  drop: float = 0.0, color_jitter: float = 0.0) -> tuple[Tensor | None, Gaussians]:
    """Training augmentation of Gaussian sets ``g`` ``[B, k]`` (decoded, normalised coordinates) and, when
    given, the images ``[B, C, H, W]`` they stand for, both the same way: a random resized crop (the
    Gaussians by :func:`crop_gaussians`, those whose centre leaves the crop marked invalid; the image by
    :func:`resized_crop` of the same box, at its own size) when ``crop_scale_min`` < 1; a random share
    ``drop`` of the Gaussians marked invalid (token dropout; each set keeps at least one); colours scaled by
    ``1 + color_jitter * u`` per set and channel (u uniform in [-1, 1]), images included. Returns
    ``(images, g)`` with ``g.valid`` set; with every setting at its default, the inputs themselves."""
    if crop_scale_min >= 1 and drop <= 0 and color_jitter <= 0:
        return images, g
    b, k = g.means.shape[:2]
    device = g.means.device
    valid = torch.ones(b, k, dtype=torch.bool, device=device) if g.valid is None else g.valid.clone()
    if crop_scale_min < 1:
        boxes = gaussian_crop_boxes(b, scale=(crop_scale_min, 1.0), generator=generator)
        g = crop_gaussians(g, boxes.to(device, g.means.dtype))
        valid &= (g.means.abs() < 1).all(-1)
        if images is not None:
            h, w = images.shape[-2:]
            pixels = torch.stack([(boxes[:, 0] + 1) / 2 * w, (boxes[:, 1] + 1) / 2 * h,
                                  (boxes[:, 2] - boxes[:, 0]) / 2 * w, (boxes[:, 3] - boxes[:, 1]) / 2 * h], -1)
            images = resized_crop(images, pixels.to(images.device), (h, w))
    if drop > 0:
        valid &= torch.rand(b, k, generator=generator).to(device) >= drop
    if color_jitter > 0:
        factor = 1 + color_jitter * (torch.rand(b, 1, g.channels, generator=generator) * 2 - 1)
        g = replace(g, colors=(g.colors * factor.to(device, g.colors.dtype)).clamp(0, 1))
        if images is not None:
            images = (images * factor[:, 0, :, None, None].to(images.device, images.dtype)).clamp(0, 1)
    valid[~valid.any(1), 0] = True  # keep each set's first Gaussian rather than leave it empty
    return images, replace(g, means=g.means.clamp(-1, 1), valid=valid)


def augment_gaussians(raw: Tensor, valid: Tensor | None, *, generator: torch.Generator, scale_factor: float = 1.0,
                      crop_scale_min: float = 1.0, drop: float = 0.0, color_jitter: float = 0.0,
                      noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """Training augmentation of raw Gaussian sets ``[B, k, 9]`` (valid ``[B, k]`` or None): the crop, token
    dropout and colour jitter of :func:`augment_pairs`, then Gaussian noise of std ``noise`` on every raw
    value. Returns ``(raw, valid)``; with every setting at its default, the inputs themselves (``valid``
    None stays None)."""
    b, k, _ = raw.shape
    if crop_scale_min >= 1 and drop <= 0 and color_jitter <= 0 and noise <= 0:
        return raw, valid
    valid = torch.ones(b, k, dtype=torch.bool, device=raw.device) if valid is None else valid.clone()
    g = replace(decode(raw.float(), scale_factor), valid=valid)
    _, g = augment_pairs(None, g, generator=generator, crop_scale_min=crop_scale_min, drop=drop,
                         color_jitter=color_jitter)
    out = encode(replace(g, scales=g.scales.clamp(max=scale_factor)), scale_factor).to(raw.dtype)
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=generator).to(out)
    return out, g.valid
