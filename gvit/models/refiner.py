"""The refinement encoder (``encoder=refine``): Gaussians that read the image where they are.

images ``[B, 3, H, W]`` and g0 ``[B, k, 9]`` -> raw Gaussians ``[B, k, 9]``:

1. a small CNN (three 3x3 convolutions, full resolution) turns the image into a feature map F;
2. g0's centres are kept (with ``learned_queries``, the centres are learned parameters, one set for
   every image, started on the grid of k cells: the ablation of the noisy g0); each Gaussian starts
   as a round splat sized to the grid spacing of k cells (0.6 spacings), opacity 0.9, with the
   image's colour at its centre (a coarse picture);
3. ``rounds`` times: every Gaussian token is its 9 raw values, F seen through its footprint
   (:func:`gvit.models.encoder.sample_footprints`: a 3x3 stencil at +-1 sigma along its axes) and,
   with ``residual``, the current render's residual (image - render) through the same footprint;
   a transformer over the k tokens (plus a per-slot embedding) predicts delta g, g <- g + delta g
   (the head of each round starts at zero, so an untrained encoder returns step 2's Gaussians).

Each round re-reads the image and the residual at the updated positions, as GaussianToken's
query decoder and Instant-GaussianImage's network-initialised fitting do. The residual render is
taken without gradient (it is an input, as an image is).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..gaussians import ANGLE, COLOR, OPACITY, RAW_DIM, SCALE, decode, grid_centres
from ..render import render
from .encoder import STENCIL, sample_footprints
from .layers import Mlp, Transformer, TransformerModel, ViTSize, get_size, init_weights

__all__ = ["RefinementEncoder"]


class RefinementEncoder(TransformerModel):
    """See the module docstring. ``size`` sets the width and heads of each round's transformer,
    ``depth`` its blocks; ``features`` is the CNN's channel count; with ``learned_queries`` the
    encoder takes no g0 (its centres are the parameter ``queries`` ``[k, 2]``, raw: tanh gives
    positions in [-1, 1])."""

    def __init__(self, image_size: int | tuple[int, int], num_gaussians: int, size: str | ViTSize = "tiny", *,
                 rounds: int = 3, depth: int = 2, features: int = 64, residual: bool = True,
                 scale_factor: float = 1.0, channels: int = 3, learned_queries: bool = False):
        super().__init__()
        size = get_size(size)
        if rounds < 1 or depth < 1 or features < 1:
            raise ValueError(f"rounds, depth and features must be >= 1, got {rounds}, {depth}, {features}")
        if channels != 3:
            raise ValueError(f"the refinement encoder reads RGB images, got {channels} channels")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.num_gaussians, self.scale_factor, self.residual = num_gaussians, scale_factor, residual
        self.learned_queries = learned_queries
        width, taps = size.width, len(STENCIL)
        self.stem = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(32, features, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(features, features, 3, padding=1))
        self.slot_embed = nn.Parameter(torch.zeros(1, num_gaussians, width))
        self.gaussian_embed = nn.ModuleList(nn.Linear(RAW_DIM, width) for _ in range(rounds))
        self.feature_embed = nn.ModuleList(nn.Linear(taps * features, width) for _ in range(rounds))
        self.residual_embed = (
            nn.ModuleList(nn.Linear(taps * channels, width) for _ in range(rounds)) if residual else None
        )
        self.rounds = nn.ModuleList(
            Transformer(ViTSize(width, depth, size.heads, size.mlp_ratio)) for _ in range(rounds)
        )
        self.heads = nn.ModuleList(Mlp(width, width, RAW_DIM) for _ in range(rounds))
        init_weights(self)
        nn.init.normal_(self.slot_embed, std=0.02)
        for head in self.heads:
            nn.init.zeros_(head.fc2.weight)
        if learned_queries:  # the centres of k near-square grid cells, row-major
            centres = grid_centres(num_gaussians)
            self.queries = nn.Parameter(torch.atanh(0.95 * centres))  # as g0 places its means

    # the optimiser's view (TransformerModel): slot embeddings are not decayed; no layer-wise decay
    _NO_DECAY = ("slot_embed", "queries")

    @property
    def num_layers(self) -> int:
        return 1

    def layer_id(self, name: str) -> int:
        return 0

    @property
    def last_attention(self):
        return self.rounds[-1].blocks[-1].attn

    def start(self, images: Tensor, g0: Tensor) -> Tensor:
        """Step 2: g0's centres as round splats of the grid spacing with the image's colour there."""
        b, k = g0.shape[:2]
        h, w = images.shape[-2:]
        spacing = 2.0 / math.sqrt(k * h / w), 2.0 / math.sqrt(k * w / h)  # (x, y) spacing of k near-square cells
        scales = (0.6 * torch.tensor(spacing, dtype=g0.dtype, device=g0.device)).clamp(max=0.9 * self.scale_factor)
        means = decode(g0, self.scale_factor).means
        colors = nn.functional.grid_sample(images, means[:, :, None, :].to(images.dtype), mode="bilinear",
                                           padding_mode="border", align_corners=False)[..., 0].transpose(1, 2)
        raw = g0.clone()
        raw[..., SCALE] = torch.logit(scales / self.scale_factor).expand(b, k, 2)
        raw[..., ANGLE] = 0.0
        raw[..., COLOR] = torch.logit(colors.clamp(1e-3, 1 - 1e-3)).to(g0.dtype)
        raw[..., OPACITY] = math.log(0.9 / 0.1)
        return raw

    def forward(self, images: Tensor, g0: Tensor | None = None) -> Tensor:
        b, k = len(images), self.num_gaussians
        if self.learned_queries:
            if g0 is not None:
                raise ValueError("g0: this encoder has learned queries and takes no g0")
            g0 = torch.cat([self.queries.expand(b, k, 2), self.queries.new_zeros(b, k, RAW_DIM - 2)], -1)
        if g0 is None or g0.shape != (b, k, RAW_DIM):
            raise ValueError(f"g0: expected [B={b}, k={k}, {RAW_DIM}], got {None if g0 is None else tuple(g0.shape)}")
        if images.shape[1:] != (3, *self.image_size):
            raise ValueError(
                f"images: expected [B, 3, {self.image_size[0]}, {self.image_size[1]}], got {tuple(images.shape)}"
            )
        fmap = self.stem(images)
        g = self.start(images, g0)
        h, w = images.shape[-2:]
        for i, transformer in enumerate(self.rounds):
            tokens = self.gaussian_embed[i](g) + self.feature_embed[i](sample_footprints(fmap, g, self.scale_factor))
            if self.residual_embed is not None:
                with torch.no_grad():
                    residual = images.float() - render(decode(g.detach().float(), self.scale_factor), height=h, width=w)
                tokens = tokens + self.residual_embed[i](sample_footprints(residual.to(images.dtype), g.detach(),
                                                                           self.scale_factor))
            g = g + self.heads[i](transformer(tokens + self.slot_embed))
        return g
