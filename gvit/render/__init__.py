"""Differentiable rasterization of batches of 2D Gaussians.

The spec (``mode="alpha"``, gsplat's compositing with every splat on the z = 0 plane):

* Coordinates as in :mod:`gvit.gaussians`: pixel (row i, column j) of an H x W image is
  evaluated at x = (2j+1)/W - 1, y = (2i+1)/H - 1.
* alpha_i = min(0.999, o_i * exp(-1/2 d^T Sigma_i^-1 d)), d = pixel - mean_i; where
  alpha_i < 1/255 the Gaussian adds nothing to that pixel.
* Front to back in index order: weight_i = alpha_i T_i, T_{i+1} = T_i (1 - alpha_i), T_0 = 1.
  A pixel stops at the first Gaussian whose T_{i+1} would be <= 1e-4, without adding it.
* Output = sum_i weight_i c_i + T_end * background.

``mode="sum"`` is the order-free accumulation of GaussianImage: sum_i o_i G_i c_i + background
with the same 1/255 rule and no cap. Culling Gaussians to the box of radius
sqrt(2 ln(255 o)) along each axis's standard deviation does not change the result.

Backends: ``"cpu"`` (numba, tile-culled, hand-written backward; float32 or float64),
``"torch"`` (dense and chunked, any device, autograd backward), ``"gsplat"`` (CUDA, alpha
mode, when gsplat is installed). ``"auto"`` picks cpu for CPU tensors, gsplat for CUDA
tensors when it is installed and the mode is alpha, torch otherwise.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from ..gaussians import Gaussians, conic
from . import _gsplat
from ._cpu import CpuRasterize, default_tile_size
from ._spec import ALPHA_MIN
from ._torch import pixel_centers, rasterize_torch

__all__ = ["rasterize", "render", "cull_extent", "pixel_centers", "BACKENDS", "MODES"]

BACKENDS = ("auto", "cpu", "torch", "gsplat")
MODES = ("alpha", "sum")
_LOG255 = -math.log(ALPHA_MIN)


def rasterize(
    means: Tensor,
    scales: Tensor,
    angles: Tensor,
    colors: Tensor,
    opacities: Tensor,
    *,
    height: int,
    width: int,
    background: Tensor | None = None,
    mode: str = "alpha",
    backend: str = "auto",
    tile_size: int | None = None,
) -> Tensor:
    """Render B sets of k Gaussians to images ``[B, C, H, W]``; differentiable in all five tensors
    and the background.

    Args:
        means: ``[B, k, 2]`` centres (x, y), normalised coordinates.
        scales: ``[B, k, 2]`` standard deviations along the Gaussian's axes, > 0, normalised units.
        angles: ``[B, k]`` radians, turning the Gaussian's x-axis from +x toward +y.
        colors: ``[B, k, C]`` for any C >= 1.
        opacities: ``[B, k]`` in [0, 1].
        height: output height in pixels.
        width: output width in pixels.
        background: ``[C]`` or ``[B, C]``; default zeros.
        mode: ``"alpha"`` (front-to-back compositing) or ``"sum"`` (order-free sum).
        backend: one of :data:`BACKENDS`.
        tile_size: tile edge in pixels for the cpu backend (default 8 up to 64 px, else 16).
    """
    _check(means, scales, angles, colors, opacities, height, width, mode, backend)
    n_img, _, n_ch = colors.shape
    if background is None:
        background = colors.new_zeros(n_img, n_ch)
    else:
        if background.shape not in ((n_ch,), (n_img, n_ch)):
            raise ValueError(
                f"background: expected shape ({n_ch},) or ({n_img}, {n_ch}), got {tuple(background.shape)}"
            )
        if background.dtype != colors.dtype or background.device != colors.device:
            raise ValueError(
                f"background: expected {colors.dtype} on {colors.device}, got {background.dtype} on {background.device}"
            )
        if not torch.isfinite(background).all():
            raise ValueError("background: contains NaN or inf")
        background = background.expand(n_img, n_ch)
    sum_mode = mode == "sum"
    if backend == "auto":
        if means.device.type == "cpu":
            backend = "cpu"
        elif means.device.type == "cuda" and not sum_mode and _gsplat.available():
            backend = "gsplat"
        else:
            backend = "torch"
    if backend == "torch":
        return rasterize_torch(means, conic(scales, angles), colors, opacities, background, height, width,
                               sum_mode=sum_mode)
    extent = cull_extent(scales, angles, opacities)
    if backend == "gsplat":
        if sum_mode:
            raise ValueError("backend='gsplat' supports mode='alpha' only")
        if means.device.type != "cuda":
            raise ValueError(f"backend='gsplat' needs CUDA tensors, got {means.device}")
        return _gsplat.rasterize_gsplat(means, conic(scales, angles), colors, opacities, background, extent,
                                        height, width)
    if means.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {means.device}")
    tile = tile_size or default_tile_size(height, width)
    if tile < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    out_dtype = colors.dtype
    if out_dtype not in (torch.float32, torch.float64):  # half precision: colours in float32
        colors, background = colors.float(), background.float()
    # geometry in float64 (see gvit.render._cpu_kernels); autograd casts its gradients back
    geometry = [t.double() for t in (means, scales, angles, opacities)]
    out = CpuRasterize.apply(geometry[0], conic(geometry[1], geometry[2]), colors, geometry[3], background,
                             extent, int(height), int(width), sum_mode, int(tile))
    return out.to(out_dtype)


def render(gaussians: Gaussians, *, height: int, width: int, **kwargs) -> Tensor:
    """:func:`rasterize` for a :class:`~gvit.gaussians.Gaussians` batch (invalid slots are skipped)."""
    g = gaussians
    return rasterize(g.means, g.scales, g.angles, g.colors, g.masked_opacities(),
                     height=height, width=width, **kwargs)


@torch.no_grad()
def cull_extent(scales: Tensor, angles: Tensor, opacities: Tensor) -> Tensor:
    """Half-widths ``[B, k, 2]`` (x, y; normalised units) of the box outside which a Gaussian's
    alpha is below 1/255: sqrt(2 ln(255 o) Sigma_xx), sqrt(2 ln(255 o) Sigma_yy). Gaussians that
    are never visible (o < 1/255) get 0. Capped at 4, which covers the whole image."""
    cos2, sin2 = torch.cos(angles).square(), torch.sin(angles).square()
    var = scales.double().square()
    sxx = cos2 * var[..., 0] + sin2 * var[..., 1]
    syy = sin2 * var[..., 0] + cos2 * var[..., 1]
    level = 2.0 * (torch.log(opacities.double().clamp_min(1e-30)) + _LOG255)
    level = level.clamp_min(0.0)
    return torch.stack([(level * sxx).sqrt(), (level * syy).sqrt()], -1).clamp(max=4.0).to(scales.dtype)


def _check(means, scales, angles, colors, opacities, height, width, mode, backend) -> None:
    named = {"means": means, "scales": scales, "angles": angles, "colors": colors, "opacities": opacities}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if means.ndim != 3 or means.shape[-1] != 2:
        raise ValueError(f"means: expected shape [B, k, 2], got {tuple(means.shape)}")
    n_img, k = means.shape[:2]
    expected = {"scales": (n_img, k, 2), "angles": (n_img, k), "opacities": (n_img, k)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)} to match means {list(means.shape)}, "
                             f"got {list(named[name].shape)}")
    if colors.ndim != 3 or tuple(colors.shape[:2]) != (n_img, k) or colors.shape[2] < 1:
        raise ValueError(f"colors: expected shape [{n_img}, {k}, C] with C >= 1, got {list(colors.shape)}")
    for name, t in named.items():
        if t.dtype != means.dtype or t.device != means.device:
            raise ValueError(
                f"{name}: expected {means.dtype} on {means.device} like means, got {t.dtype} on {t.device}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or inf")
    if (scales <= 0).any():
        raise ValueError(f"scales: must be > 0 (smallest is {scales.min().item():.3g})")
    if ((opacities < 0) | (opacities > 1)).any():
        raise ValueError(f"opacities: must lie in [0, 1] (got values in [{opacities.min().item():.3g}, "
                         f"{opacities.max().item():.3g}])")
    for name, v in (("height", height), ("width", width)):
        try:
            ok = not isinstance(v, bool) and operator.index(v) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
