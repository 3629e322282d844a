"""Image transforms in torch: batched random resized crops (training augmentation) and square resizing.

Images are ``[B, C, H, W]`` float; every image of the batch gets its own random crop / flip from
the given generator, so a seeded generator makes a batch's augmentation reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["crop_boxes", "resized_crop", "resize_square"]


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
