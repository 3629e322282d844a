"""GaussianToken: a discrete image tokenizer whose tokens are 2D Gaussians carrying a quantised
feature, and the plain VQ tokenizer it is measured against, in one class (``kind``).

images ``[B, 3, H, W]`` in [0, 1] -> CNN encoder -> map ``[B, C, H/2, W/2]`` -> tokens -> quantised
features -> a ``z``-channel map ``[B, z, H/2, W/2]`` -> CNN decoder -> images ``[B, 3, H, W]``:

* ``kind="vq"`` (A): the map, brought to a sqrt(k) x sqrt(k) grid by a strided convolution, is
  quantised cell by cell; the decoder reads the grid of codes upsampled (nearest) to the map size;
* ``kind="gaussian"`` (B): a query head (k learned anchors, refined in ``stages`` rounds of
  self-attention among the queries and deformable cross-attention, which samples the map around each
  query's current centre; x, y updated residually, the
  rest predicted afresh each round) gives each token a centre, angle, two scales and a feature;
  the feature is quantised; the k quantised features are splatted into the z-channel map
  (:func:`gvit.render.rasterize` with ``mode="sum"``, opacity 1, zero background);
* ``kind="gaussian_fixed"`` (C): B with the geometry fixed (centres on the sqrt(k) grid, scales of
  half a cell, angle 0), so only the decoder path differs from A;
* ``kind="gaussian_bits"`` (D): B with the geometry quantised too, ``geometry_bits`` bits per value
  (uniform over each value's range, straight-through), so a token's bits are counted in full.

Geometry conventions as in :mod:`gvit.gaussians` (normalised coordinates, x right, y down, angle
turning x toward y); the head's ranges follow the authors' code: centre 2 sigmoid - 1, angle
pi sigmoid, scale 0.1 + 3.9 sigmoid map pixels (converted to normalised units: * 2 / map width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..render import rasterize
from .layers import Attention, Block, Mlp, init_weights
from .quantizer import VectorQuantizer, bits_per_index

__all__ = ["Tokenizer", "TokenizerOutput", "TOKENIZER_KINDS", "GEOMETRY_VALUES"]

TOKENIZER_KINDS = ("vq", "gaussian", "gaussian_fixed", "gaussian_bits")
GEOMETRY_VALUES = 5  # x, y, angle, scale x, scale y
SCALE_MIN, SCALE_MAX = 0.1, 4.0  # map pixels


@dataclass
class TokenizerOutput:
    """``reconstruction`` ``[B, 3, H, W]`` (not clamped), ``indices`` ``[B, k]``, the weighted
    ``commitment`` loss, and for Gaussian kinds the geometry: ``means`` ``[B, k, 2]``, ``scales``
    ``[B, k, 2]`` (normalised units), ``angles`` ``[B, k]``."""

    reconstruction: Tensor
    indices: Tensor
    commitment: Tensor
    means: Tensor | None = None
    scales: Tensor | None = None
    angles: Tensor | None = None


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, channels, H/2, W/2]``."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), *(ResBlock(channels) for _ in range(blocks)),
                                 nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                                 *(ResBlock(channels) for _ in range(blocks)),
                                 nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


class ConvDecoder(nn.Module):
    """``[B, z, h, w]`` -> ``[B, 3, 2h, 2w]``."""

    def __init__(self, z: int, channels: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(z, channels, 3, padding=1), *(ResBlock(channels) for _ in range(blocks)),
                                 nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                                 *(ResBlock(channels) for _ in range(blocks)),
                                 nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z) + 1) / 2


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
    pre-activation at initialisation."""

    def __init__(self, channels: int, num_tokens: int, width: int, heads: int, *, stages: int, feature_dim: int,
                 map_layers: int = 2, layers_per_stage: int = 2, start_scale: float = 0.0):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GroupNorm(_groups(width), width))
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
        side = math.isqrt(num_tokens)
        with torch.no_grad():  # anchors start on a grid (as near-square as k allows), unit scale
            rows, cols = max(1, side), math.ceil(num_tokens / max(1, side))
            i = torch.arange(num_tokens)
            x = ((i % cols) + 0.5) / cols * 2 - 1
            y = ((i // cols) + 0.5) / rows * 2 - 1
            self.anchors[:, 0] = 2 * torch.atanh(x.clamp(-0.999, 0.999))  # 2 sigmoid(t) - 1 = tanh(t / 2)
            self.anchors[:, 1] = 2 * torch.atanh(y.clamp(-0.999, 0.999))
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
        queries = torch.zeros(b, len(self.anchors), self.width, device=fmap.device, dtype=fmap.dtype)
        for layers, refine in zip(self.stages, self.refine):
            x = queries + self.anchor_embed(values[..., :GEOMETRY_VALUES])
            reference = torch.tanh(values[..., :2] / 2)  # the current centres, 2 sigmoid - 1
            for layer in layers:
                x = layer(x, reference, memory)
            queries = x
            new = refine(x)
            values = torch.cat([values[..., :2] + new[..., :2], new[..., 2:]], -1)
        return values[..., :GEOMETRY_VALUES], values[..., GEOMETRY_VALUES:]


class Tokenizer(nn.Module):
    """See the module docstring. ``num_tokens`` (k) must be a square for ``vq`` and ``gaussian_fixed``."""

    def __init__(self, kind: str = "gaussian", *, image_size: int = 32, num_tokens: int = 64, num_codes: int = 1024,
                 z: int = 3, channels: int = 64, blocks: int = 1, width: int = 64, heads: int = 4, stages: int = 3,
                 feature_dim: int = 64, geometry_bits: int = 4, commitment: float = 0.25, decay: float = 0.8,
                 gradient: str = "rotation"):
        super().__init__()
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
        if image_size % 2 or image_size < 4:
            raise ValueError(f"image_size must be even and >= 4, got {image_size}")
        side = math.isqrt(num_tokens)
        map_size = image_size // 2
        if kind in ("vq", "gaussian_fixed") and (side * side != num_tokens or map_size % side):
            raise ValueError(f"kind={kind} puts its {num_tokens} tokens on a square grid that divides the "
                             f"{map_size}x{map_size} map; got num_tokens={num_tokens}")
        if not 1 <= geometry_bits <= 16:
            raise ValueError(f"geometry_bits must be in [1, 16], got {geometry_bits}")
        self.kind, self.image_size, self.num_tokens, self.z = kind, image_size, num_tokens, z
        self.map_size, self.geometry_bits = map_size, geometry_bits
        self.encoder = ConvEncoder(channels, blocks)
        self.decoder = ConvDecoder(z, channels, blocks)
        self.quantizer = VectorQuantizer(num_codes, z, decay=decay, commitment=commitment, gradient=gradient)
        if kind == "vq":
            stride = map_size // side
            self.to_grid = nn.Conv2d(channels, z, stride, stride=stride)
        else:
            # scales start at half a grid cell, as C's fixed ones
            half_cell = map_size / math.sqrt(num_tokens) / 2
            unit = min(max((half_cell - SCALE_MIN) / (SCALE_MAX - SCALE_MIN), 0.01), 0.99)
            self.head = GaussianQueryHead(channels, num_tokens, width, heads, stages=stages, feature_dim=feature_dim,
                                          start_scale=math.log(unit / (1 - unit)))
            self.to_code = Mlp(feature_dim, feature_dim, z)

    # -- the optimiser's view (as gvit.models.TransformerModel declares it): the anchors are not
    # decayed; one layer (no layer-wise decay)
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("anchors")}

    @property
    def num_layers(self) -> int:
        return 1

    def layer_id(self, name: str) -> int:
        return 0

    # -- geometry
    def _fixed_geometry(self, b: int, device) -> tuple[Tensor, Tensor, Tensor]:
        side = math.isqrt(self.num_tokens)
        centres = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 - 1
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        means = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).expand(b, -1, -1)
        scales = torch.full((b, self.num_tokens, 2), 0.5 * 2 / side, device=device)  # half a cell
        return means, scales, torch.zeros(b, self.num_tokens, device=device)

    def _geometry(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-activation ``[B, k, 5]`` -> means, scales (normalised units), angles."""
        unit = torch.sigmoid(raw.float())
        if self.kind == "gaussian_bits":  # uniform levels over each range, straight-through
            levels = 2 ** self.geometry_bits - 1
            unit = unit + (torch.round(unit * levels) / levels - unit).detach()
        means = unit[..., :2] * 2 - 1
        angles = math.pi * unit[..., 2]
        scales = (SCALE_MIN + (SCALE_MAX - SCALE_MIN) * unit[..., 3:5]) * 2 / self.map_size
        return means, scales, angles

    # -- the pipeline
    def splat(self, codes: Tensor, means: Tensor, scales: Tensor, angles: Tensor) -> Tensor:
        """Quantised features ``[B, k, z]`` at their Gaussians -> the z-channel map (order-free sum)."""
        ones = torch.ones(codes.shape[:2], device=codes.device, dtype=torch.float32)
        return rasterize(means, scales, angles, codes.float(), ones, height=self.map_size, width=self.map_size,
                         mode="sum")

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> TokenizerOutput:
        """Everything but the decoder; ``reconstruction`` holds the z-channel map ``[B, z, h, w]``."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images: expected [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        fmap = self.encoder(images)
        if self.kind == "vq":
            grid = self.to_grid(fmap)  # [B, z, side, side]
            q = self.quantizer(grid.permute(0, 2, 3, 1), generator)
            zmap = F.interpolate(q.values.permute(0, 3, 1, 2), size=self.map_size, mode="nearest")
            return TokenizerOutput(zmap, q.indices.flatten(1), q.commitment)
        geometry, features = self.head(fmap)
        q = self.quantizer(self.to_code(features), generator)
        if self.kind == "gaussian_fixed":
            means, scales, angles = self._fixed_geometry(len(images), images.device)
        else:
            means, scales, angles = self._geometry(geometry)
        return TokenizerOutput(self.splat(q.values, means, scales, angles), q.indices, q.commitment, means, scales,
                               angles)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> TokenizerOutput:
        out = self.encode(images, generator)
        out.reconstruction = self.decoder(out.reconstruction)
        return out

    def decode(self, indices: Tensor, means: Tensor | None = None, scales: Tensor | None = None,
               angles: Tensor | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` from token indices ``[B, k]`` (and, for Gaussian kinds other than
        ``gaussian_fixed``, their geometry): what :meth:`forward` reconstructs from the same tokens."""
        if indices.ndim != 2 or indices.shape[1] != self.num_tokens:
            raise ValueError(f"indices: expected [B, {self.num_tokens}], got {tuple(indices.shape)}")
        codes = self.quantizer.lookup(indices)
        b = len(indices)
        if self.kind == "vq":
            side = math.isqrt(self.num_tokens)
            grid = codes.view(b, side, side, self.z).permute(0, 3, 1, 2)
            return self.decoder(F.interpolate(grid, size=self.map_size, mode="nearest"))
        if self.kind == "gaussian_fixed":
            means, scales, angles = self._fixed_geometry(b, indices.device)
        elif means is None or scales is None or angles is None:
            raise ValueError(f"kind={self.kind}: decoding needs the tokens' geometry (means, scales and angles)")
        return self.decoder(self.splat(codes, means, scales, angles))

    @torch.no_grad()
    def coverage(self, out: TokenizerOutput) -> Tensor:
        """Per image ``[B]``, the fraction of map cells some token reaches (splat weight of a unit
        feature at least 1/255); 1 for ``vq``, whose codes tile the map."""
        if out.means is None:
            return torch.ones(len(out.indices), device=out.indices.device)
        ones = torch.ones(*out.means.shape[:2], 1, device=out.means.device)
        weight = self.splat(ones, out.means, out.scales, out.angles)
        return (weight >= 1 / 255).float().flatten(1).mean(1)

    def bits_per_image(self) -> float:
        """Bits of one image's tokens: the indices, plus for ``gaussian`` 5 float32 geometry values per
        token and for ``gaussian_bits`` 5 values of ``geometry_bits`` bits."""
        index_bits = self.num_tokens * bits_per_index(self.quantizer.num_codes)
        per_token = {"gaussian": 32 * GEOMETRY_VALUES, "gaussian_bits": self.geometry_bits * GEOMETRY_VALUES}
        return index_bits + self.num_tokens * per_token.get(self.kind, 0)
