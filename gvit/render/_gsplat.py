"""CUDA backend on gsplat's tile rasterizer (optional dependency, alpha mode only).

gsplat works in pixel units with pixel centres at (j + 0.5, i + 0.5); gvit's normalised
coordinates map to them by u = (x + 1) W / 2, v = (y + 1) H / 2, and the conic scales by
(2/W, 2/H) accordingly. We call gsplat's 2D stage (``isect_tiles`` + ``rasterize_to_pixels``)
with our own conics and cull radii, so its projection stage -- and with it the 0.3-pixel
low-pass filter of ``fully_fused_projection`` and its 3-sigma radius -- is not used. Index
order is passed as depth, so compositing stays front to back in index order. The remaining
differences from the spec are gsplat's float32-only arithmetic and ``__expf``, and the alpha
cap of the installed gsplat release (0.999 in the releases this was written against; older
ones used 0.99). docs/rasterizer.md records what was measured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def available() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def rasterize_gsplat(means, conics, colors, opacities, background, extent, height: int, width: int,
                     tile: int = 16) -> Tensor:
    from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels

    n_img, k = means.shape[:2]
    dtype = means.dtype
    half = means.new_tensor([width / 2.0, height / 2.0], dtype=torch.float32)
    means2d = (means.float() + 1.0) * half
    sx, sy = 2.0 / width, 2.0 / height
    conics_px = conics.float() * conics.new_tensor([sx * sx, sx * sy, sy * sy], dtype=torch.float32)
    radii = torch.where(extent > 0, torch.ceil(extent.float() * half) + 1, torch.zeros_like(extent.float()))
    radii = radii.clamp(max=float(max(height, width) * 4)).to(torch.int32)
    depths = torch.arange(k, device=means.device, dtype=torch.float32).expand(n_img, k).contiguous()
    n_tx, n_ty = math.ceil(width / tile), math.ceil(height / tile)
    try:
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, n_tx, n_ty)
    except (AssertionError, RuntimeError, TypeError):  # releases before 1.5 take radii [B, k]
        radii = radii.amax(-1) * (radii.amin(-1) > 0)
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, n_tx, n_ty)
    offsets = isect_offset_encode(isect_ids, n_img, n_tx, n_ty)
    image, _ = rasterize_to_pixels(
        means2d, conics_px, colors.float().contiguous(), opacities.float().contiguous(), width, height, tile,
        offsets, flatten_ids, backgrounds=background.float().contiguous(),
    )
    return image.permute(0, 3, 1, 2).to(dtype)
