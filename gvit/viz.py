"""Pictures of Gaussians: images to 8-bit arrays, 2-sigma ellipse overlays (paper Fig. 4), PNG files.

Drawing uses Pillow only (fast, no figure machinery); pixel (row i, column j) covers
[j, j+1) x [i, i+1) in drawing coordinates, so the normalised x maps to (x + 1) / 2 * W.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .files import atomic_path
from .gaussians import Gaussians

__all__ = ["to_uint8", "upscale_factor", "ellipse_polygons", "draw_ellipses", "save_png"]


def to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` (or ``[H, W]``) float in [0, 1] -> ``[H, W, 3]`` uint8 (values clamped)."""
    x = image.detach().float().cpu().clamp(0, 1)
    if x.ndim == 2:
        x = x.expand(3, *x.shape)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def upscale_factor(height: int, width: int, target: int = 256) -> int:
    """Integer factor that brings the longer side to at least ``target`` pixels (1 if it already is)."""
    return max(1, math.ceil(target / max(height, width)))


def ellipse_polygons(gaussians: Gaussians, height: int, width: int, *, sigma: float = 2.0,
                     points: int = 24) -> Tensor:
    """Outline of each Gaussian's ``sigma``-sigma ellipse in pixel coordinates, ``[B, k, points, 2]``
    (x, y)."""
    g = gaussians
    t = torch.linspace(0, 2 * math.pi, points + 1, dtype=torch.float64)[:-1]
    circle = torch.stack([t.cos(), t.sin()], -1)  # [P, 2]
    c, s = g.angles.double().cos()[..., None], g.angles.double().sin()[..., None]
    ax = sigma * g.scales.double()[..., 0:1] * circle[:, 0]  # [B, k, P] along the Gaussian's x-axis
    ay = sigma * g.scales.double()[..., 1:2] * circle[:, 1]
    x = g.means.double()[..., 0:1] + c * ax - s * ay
    y = g.means.double()[..., 1:2] + s * ax + c * ay
    return torch.stack([(x + 1) / 2 * width, (y + 1) / 2 * height], -1)


def draw_ellipses(image: Tensor, gaussians: Gaussians, *, sigma: float = 2.0, scale: int | None = None,
                  color: tuple[int, int, int] = (255, 220, 0), dim: float = 0.6,
                  colors: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """The ``sigma``-sigma ellipse of every valid Gaussian of one set drawn over ``image`` ``[3, H, W]``
    (in ``color``, or per Gaussian in ``colors``, one RGB triple each).

    ``gaussians`` holds one set (batch size 1). The image is dimmed by ``dim`` so the outlines stand
    out, and enlarged ``scale`` times (default: to at least 256 px). Returns ``[H*s, W*s, 3]`` uint8.
    """
    if gaussians.batch_size != 1:
        raise ValueError(f"draw_ellipses: expected one Gaussian set, got a batch of {gaussians.batch_size}")
    h, w = image.shape[-2:]
    keep = gaussians.valid[0] if gaussians.valid is not None else torch.ones(gaussians.num_gaussians, dtype=torch.bool)
    keep = keep & (gaussians.opacities[0] >= 1 / 255)
    if scale is None:  # at least 256 px, and about 6 px between neighbouring centres (up to 2048 px)
        spacing = math.sqrt(h * w / max(1, int(keep.sum())))
        scale = max(upscale_factor(h, w), min(math.ceil(6 / spacing), 2048 // max(h, w)))
    s = scale
    base = Image.fromarray(to_uint8(image * dim)).resize((w * s, h * s), Image.NEAREST)
    if int(keep.sum()) > DENSE_OUTLINES:
        return _ellipse_density(np.asarray(base), gaussians, keep, h, w, s, sigma, color)
    if colors is not None and len(colors) != gaussians.num_gaussians:
        raise ValueError(f"draw_ellipses: {len(colors)} colours for {gaussians.num_gaussians} Gaussians")
    draw = ImageDraw.Draw(base)
    polys = ellipse_polygons(gaussians, h, w, sigma=sigma)[0] * s
    for i in keep.nonzero().flatten().tolist():
        draw.polygon([tuple(p) for p in polys[i].tolist()], outline=color if colors is None else tuple(colors[i]))
    return np.asarray(base)


DENSE_OUTLINES = 1500  # above this many ellipses, outlines are drawn as a density (solid lines would fill the image)


def _ellipse_density(base: np.ndarray, gaussians: Gaussians, keep: Tensor, h: int, w: int, s: int, sigma: float,
                     color: tuple[int, int, int]) -> np.ndarray:
    """Many outlines: count outline samples per output pixel and blend ``color`` with strength
    1 - exp(-count / 2), so crowded regions glow and sparse ones show the image."""
    pts = ellipse_polygons(gaussians, h, w, sigma=sigma, points=96)[0][keep] * s
    x = pts[..., 0].round().long().flatten()
    y = pts[..., 1].round().long().flatten()
    inside = (x >= 0) & (x < w * s) & (y >= 0) & (y < h * s)
    counts = torch.zeros(h * s * w * s, dtype=torch.float64)
    counts.index_add_(0, (y[inside] * (w * s) + x[inside]), torch.ones(int(inside.sum()), dtype=torch.float64))
    strength = (1 - torch.exp(-counts / 2)).view(h * s, w * s, 1).numpy()
    out = base.astype(np.float64) * (1 - strength) + np.asarray(color, dtype=np.float64) * strength
    return out.round().astype(np.uint8)


def save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write ``[H, W, 3]`` uint8 to ``path`` as PNG, atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
