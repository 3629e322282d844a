"""Procedural shapes: the built-in default data for the demo and fast tests.

Each image shows one filled shape of a random colour, size, position and rotation over a
random two-colour gradient background. The class is the shape; the object mask is returned
too (for interpretability measurements). Deterministic for a given seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")


def _inside(kind: str, u: Tensor, v: Tensor) -> Tensor:
    """Membership of points (u, v), given in the shape's own frame (radius 1)."""
    r = torch.sqrt(u * u + v * v)
    if kind == "circle":
        return r <= 1
    if kind == "square":
        return (u.abs() <= 0.8) & (v.abs() <= 0.8)
    if kind == "triangle":
        return (v <= 0.6) & (v >= -1 + 2.0 * u.abs() * 0.94)
    if kind == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))
    if kind == "ring":
        return (r <= 1) & (r >= 0.55)
    if kind == "star":
        theta = torch.atan2(v, u)
        return r <= 0.55 + 0.45 * torch.cos(5 * theta).clamp(min=0)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_CLASSES}")


def make_shapes(n: int, size: int = 32, *, seed: int = 0, num_classes: int = len(SHAPE_CLASSES),
                attributes: bool = False):
    """Return ``(images [n, 3, size, size] in [0, 1], labels [n], masks [n, size, size] bool)``, and
    with ``attributes`` a fourth item: a dict of each shape's ``color`` ``[n, 3]``, ``radius`` ``[n]``
    (normalised units) and ``center`` ``[n, 2]`` (x, y), the same images either way."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
    if n < 0 or size < 4:
        raise ValueError(f"need n >= 0 and size >= 4, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)
    coords = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    labels = torch.randint(num_classes, (n,), generator=g)
    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    found = {"color": torch.empty(n, 3), "radius": torch.empty(n), "center": torch.empty(n, 2)}
    for i in range(n):
        c0, c1, fg = torch.rand(3, 3, generator=g)
        direction = torch.rand(1, generator=g).item() * 2 * math.pi
        t = (math.cos(direction) * xx + math.sin(direction) * yy + 1.5) / 3
        background = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        radius = 0.35 + 0.35 * torch.rand(1, generator=g).item()
        cx, cy = ((torch.rand(2, generator=g) * 2 - 1) * (0.95 - radius)).tolist()
        rot = torch.rand(1, generator=g).item() * 2 * math.pi
        du, dv = xx - cx, yy - cy
        u = (math.cos(rot) * du + math.sin(rot) * dv) / radius
        v = (-math.sin(rot) * du + math.cos(rot) * dv) / radius
        mask = _inside(SHAPE_CLASSES[labels[i]], u, v)
        if (fg - 0.5 * (c0 + c1)).abs().max() < 0.3:  # keep the shape visible against its background
            fg = 1 - fg
        images[i] = torch.where(mask, fg[:, None, None], background)
        masks[i] = mask
        found["color"][i], found["radius"][i], found["center"][i] = fg, radius, torch.tensor([cx, cy])
    return (images, labels, masks, found) if attributes else (images, labels, masks)
