"""The denoising Gaussian encoder (paper 2.2): images and random Gaussians g0 -> Gaussians g."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gaussians import COLOR, RAW_DIM, decode, rotation
from .layers import Mlp, PatchEmbed, Transformer, TransformerModel, ViTSize, get_size, init_weights

__all__ = ["GaussianEncoder", "sample_footprints", "STENCIL"]


STENCIL = torch.tensor([(u, v) for v in (-1.0, 0.0, 1.0) for u in (-1.0, 0.0, 1.0)])  # [9, 2], row-major


def sample_footprints(images: Tensor, g0: Tensor, scale_factor: float = 1.0) -> Tensor:
    """The image seen through each Gaussian of g0: ``[B, k, 9 * C]``.

    Bilinear samples (border padding) at the centre and at +-1 standard deviation along the
    Gaussian's own axes, a 3x3 stencil ``mu + R(phi) diag(sx, sy) (u, v)`` with u, v in
    {-1, 0, 1}, in normalised coordinates (``grid_sample`` with ``align_corners=False`` uses the
    pixel-centre convention of :mod:`gvit.gaussians`). Ordered stencil point-major, channel-minor.
    """
    g = decode(g0, scale_factor)
    local = STENCIL.to(g0) * g.scales[:, :, None, :]  # [B, k, 9, 2] in the Gaussian's frame
    offset = (rotation(g.angles)[:, :, None] @ local[..., None])[..., 0]
    points = (g.means[:, :, None, :] + offset).to(images.dtype)
    samples = F.grid_sample(images, points, mode="bilinear", padding_mode="border", align_corners=False)
    return samples.permute(0, 2, 3, 1).flatten(2)  # [B, C, k, 9] -> [B, k, 9 * C]


class GaussianEncoder(TransformerModel):
    """Denoising Gaussian encoder: images ``[B, 3, H, W]`` and g0 ``[B, k, 9]`` -> raw g ``[B, k, 9]``.

    Image patches and k Gaussian tokens (g0 projected to the width) go through one transformer;
    the N image latents are discarded and an MLP on the k Gaussian latents predicts delta g, so
    g = g0 + delta g (paper 2.2). The MLP's last layer starts at zero, so an untrained encoder
    returns g0. With ``learned_queries`` the k tokens are learned vectors instead of g0 and the
    MLP predicts g directly (the variant of Table 1d); g0 is then not needed.

    ``sample_image`` adds to each Gaussian token a projection of the image seen through g0's
    footprint (:func:`sample_footprints`, 27 values), so the token starts out knowing the colours
    under and around it instead of having to find its patch by attention; ``scale_factor`` is
    the c used to decode g0 for that stencil. ``image_colors`` replaces g0's random colours by
    the image's colour at each g0 centre before anything else, so g0 is already a coarse picture
    and delta g refines it (g = g0' + delta g with g0' the recoloured g0).
    """

    def __init__(self, image_size: int | tuple[int, int], patch: int, num_gaussians: int,
                 size: str | ViTSize = "tiny", learned_queries: bool = False, sample_image: bool = False,
                 scale_factor: float = 1.0, channels: int = 3, image_colors: bool = False):
        super().__init__()
        size = get_size(size)
        if (sample_image or image_colors) and learned_queries:
            raise ValueError("sample_image and image_colors need g0 (they cannot be combined with learned_queries)")
        if image_colors and channels != 3:
            raise ValueError(f"image_colors needs 3 channels, got {channels}")
        self.num_gaussians, self.learned_queries, self.image_colors = num_gaussians, learned_queries, image_colors
        self.scale_factor = scale_factor
        self.patch_embed = PatchEmbed(image_size, patch, size.width, channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + num_gaussians, size.width))
        if learned_queries:
            self.queries = nn.Parameter(torch.zeros(1, num_gaussians, size.width))
        else:
            self.gaussian_embed = nn.Linear(RAW_DIM, size.width)
        self.footprint_embed = nn.Linear(len(STENCIL) * channels, size.width) if sample_image else None
        self.transformer = Transformer(size)
        self.head = Mlp(size.width, size.width, RAW_DIM)
        init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        if learned_queries:
            nn.init.normal_(self.queries, std=0.02)
        else:
            nn.init.zeros_(self.head.fc2.weight)

    def forward(self, images: Tensor, g0: Tensor | None = None) -> Tensor:
        patches = self.patch_embed(images)
        b, k = len(images), self.num_gaussians
        if self.learned_queries:
            tokens = self.queries.expand(b, -1, -1)
        else:
            if g0 is None or g0.shape != (b, k, RAW_DIM):
                raise ValueError(f"g0: expected [B={b}, k={k}, {RAW_DIM}], got "
                                 f"{None if g0 is None else tuple(g0.shape)}")
            footprints = None
            if self.footprint_embed is not None or self.image_colors:
                footprints = sample_footprints(images, g0, self.scale_factor)
            if self.image_colors:  # the stencil's centre point (index 4) is the colour at the mean
                centre = footprints.unflatten(-1, (len(STENCIL), -1))[:, :, len(STENCIL) // 2]
                colors = torch.logit(centre.clamp(1e-3, 1 - 1e-3)).to(g0)
                g0 = torch.cat([g0[..., :COLOR.start], colors, g0[..., COLOR.stop:]], -1)
            tokens = self.gaussian_embed(g0)
            if self.footprint_embed is not None:
                tokens = tokens + self.footprint_embed(footprints)
        x = self.transformer(torch.cat([patches, tokens], 1) + self.pos_embed, last=k)  # the k Gaussian latents
        out = self.head(x)
        return out if self.learned_queries else g0 + out
