"""Device-agnostic PyTorch rasterizer: the spec written densely over (Gaussian, pixel) pairs.

Pixels are processed in chunks so at most ``max_elements`` Gaussian-pixel pairs are live at
once; with gradients on, each chunk is checkpointed (recomputed in backward), so memory stays
bounded by one chunk however large the image. Autograd provides the backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._spec import ALPHA_MAX, ALPHA_MIN, T_MIN



def pixel_centers(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Normalised coordinates of every pixel centre, row-major, ``[H*W, 2]`` as (x, y)."""
    xs = (2 * torch.arange(width, device=device, dtype=torch.float64) + 1) / width - 1
    ys = (2 * torch.arange(height, device=device, dtype=torch.float64) + 1) / height - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(dtype)


def render_pixels(means, conics, colors, opacities, background, pixels, sum_mode: bool) -> Tensor:
    """Colours ``[B, C, P]`` of the pixels ``[P, 2]`` (normalised coordinates)."""
    dx = pixels[:, 0] - means[..., 0:1]  # [B, k, P]
    dy = pixels[:, 1] - means[..., 1:2]
    a, b, c = conics[..., 0:1], conics[..., 1:2], conics[..., 2:3]
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    alpha = opacities[..., None] * torch.exp(power)
    visible = (alpha >= ALPHA_MIN) & (power <= 0)
    if sum_mode:
        weight = torch.where(visible, alpha, torch.zeros_like(alpha))
        return torch.einsum("bkp,bkc->bcp", weight, colors) + background[..., None]
    alpha = torch.where(visible, alpha.clamp(max=ALPHA_MAX), torch.zeros_like(alpha))
    # T_{i+1} only falls with i, so "stop at the first Gaussian whose T_{i+1} <= 1e-4" keeps
    # exactly the prefix of Gaussians whose T_{i+1} > 1e-4.
    with torch.no_grad():
        keep = torch.cumprod(1 - alpha, dim=1) > T_MIN
    alpha = alpha * keep
    trans_after = torch.cumprod(1 - alpha, dim=1)
    trans_before = torch.cat([torch.ones_like(trans_after[:, :1]), trans_after[:, :-1]], dim=1)
    out = torch.einsum("bkp,bkc->bcp", alpha * trans_before, colors)
    return out + trans_after[:, -1:, :] * background[..., None]


def rasterize_torch(means, conics, colors, opacities, background, height: int, width: int, *,
                    sum_mode: bool = False, max_elements: int | None = 1 << 22) -> Tensor:
    """Render ``[B, C, H, W]``; ``max_elements=None`` materialises every pair at once."""
    n_img, k = means.shape[:2]
    pixels = pixel_centers(height, width, device=means.device, dtype=means.dtype)
    n_pix = height * width
    step = n_pix if max_elements is None else max(1, max_elements // max(1, n_img * k))
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means, conics, colors, opacities, background))
    parts = []
    for start in range(0, n_pix, step):
        chunk = pixels[start:start + step]
        if needs_grad and step < n_pix:
            parts.append(checkpoint(render_pixels, means, conics, colors, opacities, background, chunk,
                                    sum_mode, use_reentrant=False))
        else:
            parts.append(render_pixels(means, conics, colors, opacities, background, chunk, sum_mode))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.reshape(n_img, colors.shape[-1], height, width)
