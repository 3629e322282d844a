"""GaussianVision's splat stem: a Gaussian set of any size -> M tokens for a ViT backbone.

Per splat (:func:`splat_set_features`, conventions of :mod:`gvit.gaussians`), for a set rendered with

* ``mode="sum"`` (order-free, GaussianImage; the paper's 8 values): centre ``(x, y)``, the matrix log
  of Sigma (xx, xy, yy; :func:`gvit.models.features.log_covariance`) and the colour it adds,
  opacity * colour;
* ``mode="alpha"``: centre, log Sigma, colour, opacity and the compositing order (the splat's rank
  among the set's valid splats, front = 0, back = 1).

The stem standardises these with dataset statistics (:func:`splat_statistics`, stored as buffers
with the model), appends Fourier features of the centre, projects to ``width`` (128 in the paper)
and pools the N splats into M tokens (``pooling``):

* ``"perceiver"``: Flamingo's Perceiver resampler, M learned latents attending (keys and values:
  splats and latents) to the splats in ``depth`` (4) layers of pre-norm attention + feed-forward;
* ``"grid"``: the mean embedding of the splats whose centres fall in each cell of a sqrt(M) grid
  (a learned token where a cell is empty), plus a learned position per cell;
* ``"curve"``: the splats ordered along a Hilbert curve through their centres and cut into M runs of
  equal count, the mean of each, plus a learned position per run.

then a LayerNorm and a projection to the backbone width. Invalid (padding) slots never reach a token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gaussians import Gaussians, valid_mask
from .features import fourier_features, log_covariance
from .layers import Mlp, init_weights

__all__ = ["SplatStem", "PerceiverResampler", "splat_set_features", "splat_statistics", "hilbert_index",
           "SPLAT_MODES", "STEM_POOLINGS"]

SPLAT_MODES = ("sum", "alpha")
STEM_POOLINGS = ("perceiver", "grid", "curve")


def splat_feature_count(mode: str) -> int:
    return {"sum": 8, "alpha": 10}[mode]


def splat_set_features(g: Gaussians, mode: str) -> Tensor:
    """``[B, N, 8]`` (sum) or ``[B, N, 10]`` (alpha) features of a batch of sets; see the module doc."""
    if mode not in SPLAT_MODES:
        raise ValueError(f"mode must be one of {', '.join(SPLAT_MODES)}, got {mode!r}")
    if g.colors.shape[-1] != 3:
        raise ValueError(f"splat features need RGB colours, got {g.colors.shape[-1]} channels")
    logcov = log_covariance(g.scales, g.angles)
    if mode == "sum":
        return torch.cat([g.means, logcov, g.colors * g.opacities[..., None]], -1)
    valid = valid_mask(g)
    rank = valid.long().cumsum(1) - 1  # front to back among the valid splats
    order = rank / (valid.sum(1, keepdim=True) - 1).clamp_min(1)
    return torch.cat([g.means, logcov, g.colors, g.opacities[..., None], order[..., None].to(g.means.dtype)], -1)


@torch.no_grad()
def splat_statistics(features: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-feature mean and standard deviation ``[F]`` over the valid splats of ``[B, N, F]`` (float64
    sums; a constant feature gets std 1)."""
    x = features.reshape(-1, features.shape[-1]).double()
    if valid is not None:
        x = x[valid.reshape(-1)]
    if len(x) == 0:
        raise ValueError("splat statistics need at least one valid splat")
    mean = x.mean(0)
    std = x.std(0, correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def hilbert_index(points: Tensor, order: int = 10) -> Tensor:
    """Position along the Hilbert curve of a 2^order x 2^order grid over [-1, 1]^2 of ``[..., 2]``
    points ``(x, y)``, as int64 ``[...]`` (neighbouring indices are neighbouring cells)."""
    n = 1 << order
    cell = ((points.clamp(-1, 1) + 1) / 2 * n).long().clamp(0, n - 1)
    x, y = cell[..., 0].clone(), cell[..., 1].clone()
    d = torch.zeros_like(x)
    s = n // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        # rotate the quadrant so the sub-curve starts where the parent's leaves off
        flip = ~ry & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return d


class PerceiverLayer(nn.Module):
    """Latents ``[B, M, d]`` attend to ``cat(splats, latents)``; pre-norm attention + feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, latents: Tensor, media: Tensor, media_valid: Tensor) -> Tensor:
        b, m, d = latents.shape
        lat = self.norm_latents(latents)
        memory = torch.cat([self.norm_media(media), lat], 1)
        q = self.q(lat).view(b, m, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(b, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        keep = torch.cat([media_valid, media_valid.new_ones(b, m)], 1)[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        latents = latents + self.proj(x.transpose(1, 2).reshape(b, m, d))
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """``[B, N, d]`` splats (with ``valid`` ``[B, N]``) -> ``[B, M, d]`` tokens for any N."""

    def __init__(self, dim: int, num_latents: int, depth: int = 4, heads: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads) for _ in range(depth))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        latents = self.latents.expand(len(x), -1, -1)
        for layer in self.layers:
            latents = layer(latents, x, valid)
        return latents


def _pool(x: Tensor, slot: Tensor, valid: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Mean of ``x [B, N, d]`` per slot id ``[B, N]`` over the valid splats -> ``[B, slots, d]``, and
    which slots got any."""
    w = valid.to(x.dtype)[..., None]
    index = slot.clamp(0, slots - 1)[..., None]
    sums = x.new_zeros(x.shape[0], slots, x.shape[-1]).scatter_add(1, index.expand_as(x), x * w)
    counts = x.new_zeros(x.shape[0], slots, 1).scatter_add(1, index, w)
    return sums / counts.clamp_min(1), counts[..., 0] > 0


class SplatStem(nn.Module):
    """See the module docstring. ``forward(gaussians)`` -> ``[B, num_tokens, out_dim]``."""

    def __init__(self, out_dim: int, *, mode: str = "sum", num_tokens: int = 64, width: int = 128, depth: int = 4,
                 heads: int = 4, frequencies: int = 8, pooling: str = "perceiver"):
        super().__init__()
        if mode not in SPLAT_MODES:
            raise ValueError(f"mode must be one of {', '.join(SPLAT_MODES)}, got {mode!r}")
        if pooling not in STEM_POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(STEM_POOLINGS)}, got {pooling!r}")
        if pooling == "grid" and math.isqrt(num_tokens) ** 2 != num_tokens:
            raise ValueError(f"pooling=grid needs a square num_tokens, got {num_tokens}")
        self.mode, self.pooling, self.num_tokens, self.frequencies = mode, pooling, num_tokens, frequencies
        features = splat_feature_count(mode)
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_std", torch.ones(features))
        self.embed = nn.Linear(features + 4 * frequencies, width)
        if pooling == "perceiver":
            self.resampler = PerceiverResampler(width, num_tokens, depth, heads)
        else:
            self.slot_embed = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
            self.empty = nn.Parameter(torch.zeros(width))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        self.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.split(".")[-1] in ("latents", "slot_embed", "empty")}

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs with these per-feature statistics (:func:`splat_statistics`)."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape or not (std > 0).all():
            raise ValueError(f"splat statistics: expected mean and positive std of shape "
                             f"{tuple(self.feature_mean.shape)}, got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def features(self, g: Gaussians) -> Tensor:
        raw = splat_set_features(g, self.mode)
        x = (raw - self.feature_mean) / self.feature_std
        return torch.cat([x, fourier_features(g.means, self.frequencies)], -1)

    def forward(self, g: Gaussians) -> Tensor:
        valid = valid_mask(g)
        if not valid.any(1).all():
            raise ValueError("splat stem: every set needs at least one valid splat")
        x = self.embed(self.features(g).to(self.embed.weight.dtype))
        if self.pooling == "perceiver":
            tokens = self.resampler(x, valid)
        else:
            if self.pooling == "grid":
                side = math.isqrt(self.num_tokens)
                cell = ((g.means + 1) / 2 * side).long().clamp(0, side - 1)
                slot = cell[..., 1] * side + cell[..., 0]
            else:  # runs of equal count along the Hilbert curve, invalid splats last
                key = torch.where(valid, hilbert_index(g.means), torch.iinfo(torch.int64).max)
                rank = key.argsort(dim=1, stable=True).argsort(dim=1)
                slot = rank * self.num_tokens // valid.sum(1, keepdim=True)
            pooled, filled = _pool(x, slot, valid, self.num_tokens)
            tokens = torch.where(filled[..., None], pooled, self.empty) + self.slot_embed
        return self.proj(self.norm(tokens))
