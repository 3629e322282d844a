"""GaussianToken: a discrete image tokenizer whose tokens are 2D Gaussians carrying a quantised
feature, and the plain VQ tokenizer it is measured against: one base class (:class:`Tokenizer`,
the CNN encoder and decoder and the quantiser) and one class per path (:class:`GridVQTokenizer`,
:class:`GaussianTokenizer`), built by :func:`make_tokenizer`.

images ``[B, 3, H, W]`` in [0, 1] -> CNN encoder -> map ``[B, C, H/2, W/2]`` -> tokens -> quantised
features -> a ``z``-channel map ``[B, z, H/2, W/2]`` -> CNN decoder -> images ``[B, 3, H, W]``:

* ``kind="vq"`` (A): B's query head (below) with its centres fixed on the sqrt(k) x sqrt(k) grid
  gives each grid cell a feature, quantised cell by cell; the decoder reads the grid of codes
  upsampled (nearest) to the map size. A and B have the same head, so A vs B isolates the Gaussian
  geometry and splatting. ``kind="vq_conv"``: the first A, each cell's feature from one strided
  convolution over the map (no query head);
* ``kind="gaussian"`` (B): a query head (k learned anchors, refined in ``stages`` rounds of
  self-attention among the queries and deformable cross-attention, which samples the map around each
  query's current centre; x, y updated residually, the
  rest predicted afresh each round) gives each token a centre, angle, two scales and a feature;
  the feature is quantised; the k quantised features are splatted into the z-channel map
  (:func:`gvit.render.rasterize` with ``mode="sum"``, opacity 1, zero background);
* ``kind="gaussian_fixed"`` (C): B with the splatted geometry fixed (centres on the sqrt(k) grid,
  scales of half a cell, angle 0): B's query head computes the features, its queries still reading
  the map around centres they move, so C differs from A in where the head reads (moving centres
  against grid ones) and in the decoder path (splatting instead of upsampled grid cells);
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

from ..gaussians import grid_centres
from ..render import rasterize
from .layers import Mlp, norm_groups
from .quantizer import VectorQuantizer, bits_per_index
from .query_head import GEOMETRY_VALUES, GaussianQueryHead

__all__ = ["Tokenizer", "GridVQTokenizer", "GaussianTokenizer", "make_tokenizer", "TokenizerOutput", "TOKENIZER_KINDS",
           "GEOMETRY_VALUES"]

TOKENIZER_KINDS = ("vq", "vq_conv", "gaussian", "gaussian_fixed", "gaussian_bits")
SCALE_MIN, SCALE_MAX = 0.1, 4.0  # map pixels


@dataclass
class TokenizerOutput:
    """What a tokenizer makes of images: ``indices`` ``[B, k]``, the weighted ``commitment`` loss,
    ``zmap`` ``[B, z, h, w]`` (the quantised features as the decoder reads them), ``reconstruction``
    ``[B, 3, H, W]`` (not clamped; None after :meth:`Tokenizer.encode`, which stops before the
    decoder), and for Gaussian tokens the geometry: ``means`` ``[B, k, 2]``, ``scales`` ``[B, k, 2]``
    (normalised units), ``angles`` ``[B, k]``."""

    indices: Tensor
    commitment: Tensor
    zmap: Tensor
    reconstruction: Tensor | None = None
    means: Tensor | None = None
    scales: Tensor | None = None
    angles: Tensor | None = None


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(),
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
                                 nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


class ConvDecoder(nn.Module):
    """``[B, z, h, w]`` -> ``[B, 3, 2h, 2w]``."""

    def __init__(self, z: int, channels: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(z, channels, 3, padding=1), *(ResBlock(channels) for _ in range(blocks)),
                                 nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(channels, channels, 3, padding=1),
                                 *(ResBlock(channels) for _ in range(blocks)),
                                 nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z) + 1) / 2


class Tokenizer(nn.Module):
    """What every tokenizer shares: the CNN encoder and decoder and the quantiser; a subclass turns
    the encoder's map into quantised tokens (:meth:`tokens`) and quantised codes into the decoder's
    z-channel map (:meth:`zmap`). Build one with :func:`make_tokenizer`."""

    kind = ""
    gaussian_tokens = False  # the tokens are Gaussians (their geometry is in the output)
    stored_geometry = 0  # bits of geometry stored per token besides its index

    def __init__(self, *, image_size: int, num_tokens: int, num_codes: int, z: int, channels: int, blocks: int,
                 commitment: float, decay: float, gradient: str):
        super().__init__()
        if image_size % 2 or image_size < 4:
            raise ValueError(f"image_size must be even and >= 4, got {image_size}")
        self.image_size, self.num_tokens, self.z, self.map_size = image_size, num_tokens, z, image_size // 2
        self.encoder = ConvEncoder(channels, blocks)
        self.decoder = ConvDecoder(z, channels, blocks)
        self.quantizer = VectorQuantizer(num_codes, z, decay=decay, commitment=commitment, gradient=gradient)

    def _square_grid(self) -> int:
        """The side of the square token grid (k must be a square whose side divides the map)."""
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens or self.map_size % side:
            raise ValueError(f"kind={self.kind} puts its {self.num_tokens} tokens on a square grid that divides the "
                             f"{self.map_size}x{self.map_size} map; got num_tokens={self.num_tokens}")
        return side

    # -- the optimiser's view (as gvit.models.TransformerModel declares it): the anchors are not
    # decayed; one layer (no layer-wise decay)
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("anchors")}

    @property
    def num_layers(self) -> int:
        return 1

    def layer_id(self, name: str) -> int:
        return 0

    # -- the pipeline
    def tokens(self, fmap: Tensor, generator: torch.Generator | None) -> TokenizerOutput:
        """The encoder's map ``[B, C, h, w]`` -> quantised tokens and their z-map."""
        raise NotImplementedError

    def zmap(self, codes: Tensor, means: Tensor | None, scales: Tensor | None, angles: Tensor | None) -> Tensor:
        """Quantised codes ``[B, k, z]`` (and the tokens' geometry) -> the z-channel map ``[B, z, h, w]``."""
        raise NotImplementedError

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> TokenizerOutput:
        """Everything but the decoder (``reconstruction`` stays None)."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images: expected [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        return self.tokens(self.encoder(images), generator)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> TokenizerOutput:
        out = self.encode(images, generator)
        out.reconstruction = self.decoder(out.zmap)
        return out

    def decode(self, indices: Tensor, means: Tensor | None = None, scales: Tensor | None = None,
               angles: Tensor | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` from token indices ``[B, k]`` (and the geometry of tokens that store
        it): what :meth:`forward` reconstructs from the same tokens."""
        if indices.ndim != 2 or indices.shape[1] != self.num_tokens:
            raise ValueError(f"indices: expected [B, {self.num_tokens}], got {tuple(indices.shape)}")
        return self.decoder(self.zmap(self.quantizer.lookup(indices), means, scales, angles))

    @torch.no_grad()
    def coverage(self, out: TokenizerOutput) -> Tensor:
        """Per image ``[B]``, the fraction of map cells some token reaches: 1 where the codes tile the map."""
        return torch.ones(len(out.indices), device=out.indices.device)

    def bits_per_image(self) -> float:
        """Bits of one image's tokens: the indices and the geometry stored beside them."""
        return self.num_tokens * (bits_per_index(self.quantizer.num_codes) + self.stored_geometry)


class GridVQTokenizer(Tokenizer):
    """Plain VQ on a sqrt(k) x sqrt(k) grid of tokens, quantised cell by cell; the decoder reads the
    grid of codes upsampled (nearest) to the map size. ``vq`` (A): each cell's feature comes from
    B's query head with its centres fixed on the grid (the same capacity as B's tokens);
    ``vq_conv``: from one strided convolution over the map (the first A, kept for its figures)."""

    def __init__(self, kind: str = "vq", *, width: int = 64, heads: int = 4, stages: int = 3, feature_dim: int = 64,
                 **kw):
        super().__init__(**kw)
        self.kind = kind
        self.side = self._square_grid()
        channels = self.encoder.net[-1].out_channels
        if kind == "vq_conv":
            stride = self.map_size // self.side
            self.to_grid = nn.Conv2d(channels, self.z, stride, stride=stride)
        else:
            self.head = GaussianQueryHead(channels, self.num_tokens, width, heads, stages=stages,
                                          feature_dim=feature_dim, fixed_centres=True)
            self.to_code = Mlp(feature_dim, feature_dim, self.z)

    def tokens(self, fmap, generator):
        if self.kind == "vq_conv":
            cells = self.to_grid(fmap).permute(0, 2, 3, 1).flatten(1, 2)  # [B, k, z], row-major
        else:
            cells = self.to_code(self.head(fmap)[1])  # the anchors are grid_centres(k): row-major too
        q = self.quantizer(cells, generator)
        return TokenizerOutput(q.indices, q.commitment, self.zmap(q.values))

    def zmap(self, codes, means=None, scales=None, angles=None):
        grid = codes.reshape(len(codes), self.side, self.side, self.z).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=self.map_size, mode="nearest")


class GaussianTokenizer(Tokenizer):
    """``gaussian`` (B), ``gaussian_fixed`` (C) and ``gaussian_bits`` (D): a query head gives each
    token a geometry and a feature; the quantised features are splatted at their Gaussians."""

    gaussian_tokens = True

    def __init__(self, kind: str, *, width: int, heads: int, stages: int, feature_dim: int, geometry_bits: int, **kw):
        super().__init__(**kw)
        if not 1 <= geometry_bits <= 16:
            raise ValueError(f"geometry_bits must be in [1, 16], got {geometry_bits}")
        self.kind, self.geometry_bits = kind, geometry_bits
        self.stored_geometry = {"gaussian": 32 * GEOMETRY_VALUES, "gaussian_bits": geometry_bits * GEOMETRY_VALUES,
                                "gaussian_fixed": 0}[kind]
        if kind == "gaussian_fixed":
            self._square_grid()
        # scales start at half a grid cell, as C's fixed ones
        half_cell = self.map_size / math.sqrt(self.num_tokens) / 2
        unit = min(max((half_cell - SCALE_MIN) / (SCALE_MAX - SCALE_MIN), 0.01), 0.99)
        self.head = GaussianQueryHead(self.encoder.net[-1].out_channels, self.num_tokens, width, heads, stages=stages,
                                      feature_dim=feature_dim, start_scale=math.log(unit / (1 - unit)))
        self.to_code = Mlp(feature_dim, feature_dim, self.z)

    def fixed_geometry(self, b: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """C's geometry: centres on the sqrt(k) grid, scales of half a cell, angle 0."""
        means = grid_centres(self.num_tokens).to(device).expand(b, -1, -1)
        side = math.isqrt(self.num_tokens)
        scales = torch.full((b, self.num_tokens, 2), 0.5 * 2 / side, device=device)  # half a cell
        return means, scales, torch.zeros(b, self.num_tokens, device=device)

    def geometry(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-activation ``[B, k, 5]`` -> means, scales (normalised units), angles."""
        unit = torch.sigmoid(raw.float())
        if self.kind == "gaussian_bits":  # uniform levels over each range, straight-through
            levels = 2 ** self.geometry_bits - 1
            unit = unit + (torch.round(unit * levels) / levels - unit).detach()
        means = unit[..., :2] * 2 - 1
        angles = math.pi * unit[..., 2]
        scales = (SCALE_MIN + (SCALE_MAX - SCALE_MIN) * unit[..., 3:5]) * 2 / self.map_size
        return means, scales, angles

    def tokens(self, fmap, generator):
        raw, features = self.head(fmap)
        q = self.quantizer(self.to_code(features), generator)
        if self.kind == "gaussian_fixed":
            means, scales, angles = self.fixed_geometry(len(fmap), fmap.device)
        else:
            means, scales, angles = self.geometry(raw)
        return TokenizerOutput(q.indices, q.commitment, self.zmap(q.values, means, scales, angles), None, means,
                               scales, angles)

    def zmap(self, codes, means=None, scales=None, angles=None):
        """Quantised features ``[B, k, z]`` at their Gaussians -> the z-channel map (order-free sum)."""
        if self.kind == "gaussian_fixed":
            means, scales, angles = self.fixed_geometry(len(codes), codes.device)
        elif means is None or scales is None or angles is None:
            raise ValueError(f"kind={self.kind}: decoding needs the tokens' geometry (means, scales and angles)")
        ones = torch.ones(codes.shape[:2], device=codes.device, dtype=torch.float32)
        return rasterize(means, scales, angles, codes.float(), ones, height=self.map_size, width=self.map_size,
                         mode="sum")

    @torch.no_grad()
    def coverage(self, out: TokenizerOutput) -> Tensor:
        """Per image ``[B]``, the fraction of map cells a unit feature reaches with weight >= 1/255."""
        ones = torch.ones(*out.means.shape[:2], 1, device=out.means.device)
        weight = self.zmap(ones, out.means, out.scales, out.angles)
        return (weight >= 1 / 255).float().flatten(1).mean(1)


def make_tokenizer(kind: str = "gaussian", *, image_size: int = 32, num_tokens: int = 64, num_codes: int = 1024,
                   z: int = 3, channels: int = 64, blocks: int = 1, width: int = 64, heads: int = 4, stages: int = 3,
                   feature_dim: int = 64, geometry_bits: int = 4, commitment: float = 0.25, decay: float = 0.8,
                   gradient: str = "rotation") -> Tokenizer:
    """The tokenizer of ``kind`` (see the module docstring). ``num_tokens`` (k) must be a square for
    ``vq`` and ``gaussian_fixed``."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    shared = dict(image_size=image_size, num_tokens=num_tokens, num_codes=num_codes, z=z, channels=channels,
                  blocks=blocks, commitment=commitment, decay=decay, gradient=gradient)
    head = dict(width=width, heads=heads, stages=stages, feature_dim=feature_dim)
    if kind in ("vq", "vq_conv"):
        return GridVQTokenizer(kind, **head, **shared)
    return GaussianTokenizer(kind, geometry_bits=geometry_bits, **head, **shared)
