"""An independent, deliberately plain float64 formulation of the rasterizer spec.

It walks the Gaussians one at a time in index order (no cumprod, no culling, no tiles) and
inverts each covariance with torch.linalg.inv, so it shares no code path with gvit.render.
Differentiable through autograd; slow, for small scenes only.
"""

import math

import torch


def reference_render(means, scales, angles, colors, opacities, height, width, background=None, mode="alpha"):
    f64 = [t.double() for t in (means, scales, angles, colors, opacities)]
    means, scales, angles, colors, opacities = f64
    n_img, k, n_ch = colors.shape
    bg = (
        torch.zeros(n_img, n_ch, dtype=torch.float64) if background is None else background.double().expand(n_img, n_ch)
    )
    jj = torch.arange(width, dtype=torch.float64)
    ii = torch.arange(height, dtype=torch.float64)
    x = ((2 * jj + 1) / width - 1)[None, :].expand(height, width)
    y = ((2 * ii + 1) / height - 1)[:, None].expand(height, width)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    cov = rot @ torch.diag_embed(scales**2) @ rot.transpose(-1, -2)
    inv = torch.linalg.inv(cov)
    images = []
    for b in range(n_img):
        out = torch.zeros(n_ch, height, width, dtype=torch.float64)
        trans = torch.ones(height, width, dtype=torch.float64)
        done = torch.zeros(height, width, dtype=torch.bool)
        for i in range(k):
            dx, dy = x - means[b, i, 0], y - means[b, i, 1]
            q = inv[b, i, 0, 0] * dx * dx + 2 * inv[b, i, 0, 1] * dx * dy + inv[b, i, 1, 1] * dy * dy
            alpha = opacities[b, i] * torch.exp(-0.5 * q)
            skip = alpha < 1.0 / 255.0
            if mode == "sum":
                w = torch.where(skip, torch.zeros_like(alpha), alpha)
                out = out + w * colors[b, i][:, None, None]
                continue
            alpha = torch.clamp(alpha, max=0.999)
            next_t = trans * (1 - alpha)
            stop = ~skip & ~done & (next_t <= 1e-4)
            done = done | stop
            use = ~skip & ~done
            w = torch.where(use, alpha * trans, torch.zeros_like(alpha))
            out = out + w * colors[b, i][:, None, None]
            trans = torch.where(use, next_t, trans)
        bg_w = torch.ones_like(trans) if mode == "sum" else trans
        images.append(out + bg_w * bg[b][:, None, None])
    return torch.stack(images)


def random_scene(n_img, k, n_ch, *, seed, spread=1.3, log_scale=(math.log(1 / 64), math.log(1 / 4)),
                 opacity=(0.05, 1.0), dtype=torch.float32):
    """Random Gaussians; means in [-spread, spread] so some lie partly or wholly outside."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n_img, k, 2, generator=g) * 2 - 1) * spread
    scales = torch.exp(torch.empty(n_img, k, 2).uniform_(*log_scale, generator=g))
    angles = (torch.rand(n_img, k, generator=g) * 2 - 1) * math.pi
    colors = torch.rand(n_img, k, n_ch, generator=g)
    opacities = torch.empty(n_img, k).uniform_(*opacity, generator=g)
    return [t.to(dtype) for t in (means, scales, angles, colors, opacities)]
