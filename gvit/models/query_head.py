"""GaussianToken's query head (:class:`GaussianQueryHead`): k learned anchors, refined in rounds of
self-attention among the queries and deformable cross-attention into the encoder's map, give each
token a pre-activation geometry (x, y, angle, two scales) and a feature
(:class:`gvit.models.tokenizer.GaussianTokenizer` turns them into Gaussians and codes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gaussians import grid_centres
from .layers import Attention, Block, Mlp, init_weights, norm_groups

__all__ = ["GaussianQueryHead", "DeformableCrossAttention", "DecoderLayer", "sine_positions", "GEOMETRY_VALUES"]

GEOMETRY_VALUES = 5  # x, y, angle, scale x, scale y


def sine_positions(h: int, w: int, dim: int, device=None) -> Tensor:
    """2D sine-cosine position embedding ``[h * w, dim]`` (row-major; half the channels for y, half for x)."""
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    out = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angle = coord[:, None] * freqs[None]
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, -1)


class DeformableCrossAttention(nn.Module):
    """Deformable DETR's cross-attention at one level: each query, per head, reads ``points`` bilinear
    samples of the value map around its reference point (learned offsets in map pixels) and mixes them
    with softmax weights. Queries ``[B, k, D]``, reference points ``[B, k, 2]`` (normalised
    coordinates), map ``[B, D, h, w]``."""

    def __init__(self, dim: int, heads: int, points: int = 4):
        super().__init__()
        self.heads, self.points = heads, points
        self.offsets = nn.Linear(dim, heads * points * 2)
        self.weights = nn.Linear(dim, heads * points)
        self.value, self.proj = nn.Conv2d(dim, dim, 1), nn.Linear(dim, dim)

    def reset_offsets(self) -> None:
        """Offsets start at 0 weight, the bias pointing each head in its own direction, point p at
        distance p + 1 (Deformable DETR); uniform mixing weights."""
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)
        angle = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        bias = direction[:, None, :] * torch.arange(1, self.points + 1, dtype=torch.float32)[None, :, None]
        with torch.no_grad():
            self.offsets.bias.copy_(bias.flatten())

    def forward(self, x: Tensor, reference: Tensor, fmap: Tensor) -> Tensor:
        b, k, d = x.shape
        h, w = fmap.shape[-2:]
        heads, points = self.heads, self.points
        value = self.value(fmap).view(b * heads, d // heads, h, w)
        pixel = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)  # map pixels -> normalised
        offsets = self.offsets(x).view(b, k, heads, points, 2) * pixel
        where = (reference[:, :, None, None, :].to(x.dtype) + offsets).permute(0, 2, 1, 3, 4)  # [B, H, k, P, 2]
        sampled = F.grid_sample(value, where.reshape(b * heads, k, points, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # [B*H, d/H, k, P]
        weights = self.weights(x).view(b, k, heads, points).softmax(-1).permute(0, 2, 1, 3)
        out = (sampled.view(b, heads, d // heads, k, points) * weights[:, :, None]).sum(-1)  # [B, H, d/H, k]
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, k, d))


class DecoderLayer(nn.Module):
    """Queries ``[B, k, D]``: self-attention among them, deformable cross-attention into the map around
    each query's centre, then an MLP (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.self_attn = Attention(dim, heads)
        self.cross_attn = DeformableCrossAttention(dim, heads)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, reference: Tensor, fmap: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), reference, fmap)
        return x + self.mlp(self.norm3(x))


class GaussianQueryHead(nn.Module):
    """Map ``[B, C, h, w]`` -> pre-activation geometry ``[B, k, 5]`` (x, y, angle, sx, sy) and
    features ``[B, k, feature_dim]`` (see the module docstring). ``start_scale``: the scales'
    pre-activation at initialisation. ``fixed_centres``: every query reads the map around its anchor's
    grid centre in every round (the centres are neither learned nor refined; the plain VQ tokenizer's
    head, on grid positions)."""

    def __init__(self, channels: int, num_tokens: int, width: int, heads: int, *, stages: int, feature_dim: int,
                 map_layers: int = 2, layers_per_stage: int = 2, start_scale: float = 0.0, fixed_centres: bool = False):
        super().__init__()
        self.fixed_centres = fixed_centres
        self.proj = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GroupNorm(norm_groups(width), width))
        self.map_layers = nn.ModuleList(Block(width, heads) for _ in range(map_layers))
        self.anchors = nn.Parameter(torch.zeros(num_tokens, GEOMETRY_VALUES + feature_dim))
        self.anchor_embed = Mlp(GEOMETRY_VALUES, width, width)
        self.stages = nn.ModuleList(nn.ModuleList(DecoderLayer(width, heads) for _ in range(layers_per_stage))
                                    for _ in range(stages))
        self.refine = nn.ModuleList(Mlp(width, width, GEOMETRY_VALUES + feature_dim) for _ in range(stages))
        self.width = width
        init_weights(self)
        for module in self.modules():
            if isinstance(module, DeformableCrossAttention):
                module.reset_offsets()
        with torch.no_grad():  # anchors start on a grid (as near-square as k allows), unit scale
            centres = grid_centres(num_tokens).clamp(-0.999, 0.999)
            for axis in (0, 1):  # 2 sigmoid(t) - 1 = tanh(t / 2)
                self.anchors[:, axis] = 2 * torch.atanh(centres[:, axis].contiguous())
            self.anchors[:, GEOMETRY_VALUES:].normal_(std=0.02)
            self.anchors[:, 3:5] = start_scale  # scales start where the refine MLPs' bias puts them too
            for refine in self.refine:
                refine.fc2.bias[3:5] = start_scale

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = fmap.shape
        memory = self.proj(fmap).flatten(2).transpose(1, 2) + sine_positions(h, w, self.width, fmap.device)
        for layer in self.map_layers:  # map tokens attend to each other
            memory = layer(memory)
        memory = memory.transpose(1, 2).reshape(b, self.width, h, w)
        values = self.anchors.expand(b, -1, -1)
        if self.fixed_centres:  # the grid centres the anchors start at, not learned
            values = torch.cat([values[..., :2].detach(), values[..., 2:]], -1)
        queries = torch.zeros(b, len(self.anchors), self.width, device=fmap.device, dtype=fmap.dtype)
        for layers, refine in zip(self.stages, self.refine):
            x = queries + self.anchor_embed(values[..., :GEOMETRY_VALUES])
            reference = torch.tanh(values[..., :2] / 2)  # the current centres, 2 sigmoid - 1
            for layer in layers:
                x = layer(x, reference, memory)
            queries = x
            new = refine(x)
            centres = values[..., :2] if self.fixed_centres else values[..., :2] + new[..., :2]
            values = torch.cat([centres, new[..., 2:]], -1)
        return values[..., :GEOMETRY_VALUES], values[..., GEOMETRY_VALUES:]
