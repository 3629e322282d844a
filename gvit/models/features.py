"""Token features of a Gaussian from its geometry and appearance (GaussianVision's splat features):
Fourier features of the centre, the matrix log of the covariance, colour and opacity.

For raw Gaussians ``[B, k, 9]`` (decoded with ``scale_factor``):

* centre ``(x, y)`` in normalised coordinates and ``sin / cos(2^l * pi * x)``, l < ``frequencies``;
* ``log Sigma`` = R(phi) diag(2 log sx, 2 log sy) R(phi)^T as its three unique entries (xx, xy, yy):
  smooth, unique, and unchanged by phi -> phi + pi or by swapping the axes (with phi + pi / 2);
* colour (3) and opacity (1).

``splat_features(raw, scale_factor, frequencies)`` gives ``[B, k, 2 + 4 * frequencies + 3 + 4]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gaussians import decode, rotation

__all__ = ["log_covariance", "fourier_features", "splat_features", "splat_feature_dim"]


def log_covariance(scales: Tensor, angles: Tensor) -> Tensor:
    """The matrix log of Sigma as ``[..., 3]`` (xx, xy, yy)."""
    r = rotation(angles)
    logs = 2 * torch.log(scales)
    m = r @ torch.diag_embed(logs) @ r.transpose(-1, -2)
    return torch.stack([m[..., 0, 0], m[..., 0, 1], m[..., 1, 1]], -1)


def fourier_features(points: Tensor, frequencies: int) -> Tensor:
    """``[..., d]`` -> ``[..., 2 * d * frequencies]``: sin and cos of 2^l * pi * p."""
    scales = (2.0 ** torch.arange(frequencies, device=points.device, dtype=points.dtype)) * math.pi
    angles = points[..., None] * scales  # [..., d, L]
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def splat_feature_dim(frequencies: int) -> int:
    return 2 + 4 * frequencies + 3 + 3 + 1


def splat_features(raw: Tensor, scale_factor: float = 1.0, frequencies: int = 6) -> Tensor:
    """Features ``[B, k, splat_feature_dim(frequencies)]`` of raw Gaussians ``[B, k, 9]``."""
    g = decode(raw, scale_factor)
    return torch.cat([g.means, fourier_features(g.means, frequencies), log_covariance(g.scales, g.angles),
                      g.colors, g.opacities[..., None]], -1)
