"""ViT building blocks and the GViT models (paper 2.2, Appendix A).

* :class:`Attention`, :class:`Mlp`, :class:`Block`: pre-norm transformer pieces (timm's layout);
  attention runs through ``F.scaled_dot_product_attention`` and takes a key-padding mask, so
  Gaussian sets of varying size (``valid`` masks) are handled exactly.
* :class:`PatchViT`: the patch baseline. :class:`GaussianEncoder`: image patches + k Gaussian
  tokens -> transformer -> the k Gaussian latents -> MLP -> residual, ``g = g0 + delta g``
  (or k learned queries -> g). :class:`GaussianClassifier`: k Gaussians (9 values each,
  linearly projected to its width) as tokens.

Sizes (:data:`SIZES`): ``micro`` and ``tiny`` train on a CPU; ``S`` and ``B`` are ViT-S and ViT-B
(width 384 / 768, depth 12, 6 / 12 heads). Weights: xavier_uniform for linear layers, position
embeddings and the class token N(0, 0.02), LayerNorm 1/0 (as MAE and timm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gaussians import COLOR, RAW_DIM, decode, rotation

__all__ = ["ViTSize", "SIZES", "Attention", "Mlp", "Block", "Transformer", "PatchEmbed", "PatchViT",
           "GaussianEncoder", "GaussianClassifier", "sample_footprints"]


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


SIZES = {
    "micro": ViTSize(64, 2, 2),
    "tiny": ViTSize(128, 4, 4),
    "S": ViTSize(384, 12, 6),
    "B": ViTSize(768, 12, 12),
}


def get_size(size: str | ViTSize) -> ViTSize:
    if isinstance(size, ViTSize):
        return size
    if size not in SIZES:
        raise ValueError(f"model size must be one of {', '.join(SIZES)}, got {size!r}")
    return SIZES[size]


class Attention(nn.Module):
    """Multi-head self-attention. ``mask`` ``[B, N]`` bool: True for tokens that may be attended to.
    With ``last`` only the last ``last`` tokens query (all N are keys and values): ``[B, last, D]``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, last: int | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last is not None:
            q = q[:, :, n - last:]
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, q.shape[2], d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). With ``last`` only the
    last ``last`` tokens are computed (they still attend to all): ``[B, last, D]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None, last: int | None = None) -> Tensor:
        x = (x if last is None else x[:, x.shape[1] - last:]) + self.attn(self.norm1(x), mask, last)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``depth`` blocks and a final LayerNorm. ``last``: return only the last ``last`` tokens,
    which the final block then computes alone (the same values, less work: the encoder keeps
    only its k Gaussian latents)."""

    def __init__(self, size: ViTSize):
        super().__init__()
        self.blocks = nn.ModuleList([Block(size.width, size.heads, size.mlp_ratio) for _ in range(size.depth)])
        self.norm = nn.LayerNorm(size.width, eps=1e-6)

    def forward(self, x: Tensor, mask: Tensor | None = None, last: int | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last if i == len(self.blocks) - 1 else None)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """xavier_uniform for Linear weights (zero bias), LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), width]`` non-overlapping patches, row-major."""

    def __init__(self, image_size: int | tuple[int, int], patch: int, width: int, channels: int = 3):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
        self.image_size, self.patch, self.channels = (h, w), patch, channels
        self.num_patches = (h // patch) * (w // patch)
        self.proj = nn.Linear(channels * patch * patch, width)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (self.channels, *self.image_size):
            raise ValueError(f"images: expected [B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(x.shape)}")
        p = self.patch
        b, c, h, w = x.shape
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return self.proj(x)


class _TokenViT(nn.Module):
    """A transformer over ``num_tokens`` embedded tokens with learned position embeddings and
    an optional class token; the head reads the class token or the mean of the valid tokens."""

    def __init__(self, num_tokens: int, num_classes: int, size: ViTSize, pool: str):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        width = size.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + (pool == "cls"), width))  # class token's too
        self.transformer = Transformer(size)
        self.head = nn.Linear(width, num_classes)

    def _init_tokens(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def features(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pooled features ``[B, width]`` from embedded tokens ``[B, N, width]``."""
        x = tokens
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(len(x), 1), mask], 1)
        x = self.transformer(x + self.pos_embed, mask)
        if self.cls_token is not None:
            return x[:, 0]
        if mask is None:
            return x.mean(1)
        m = mask.to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1).clamp_min(1)


class PatchViT(_TokenViT):
    """The patch ViT baseline: ``[B, 3, H, W]`` -> logits ``[B, num_classes]``."""

    def __init__(self, image_size: int | tuple[int, int], patch: int, num_classes: int, size: str | ViTSize = "tiny",
                 pool: str = "cls"):
        size = get_size(size)
        embed = PatchEmbed(image_size, patch, size.width)
        super().__init__(embed.num_patches, num_classes, size, pool)
        self.patch_embed = embed
        init_weights(self)
        self._init_tokens()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(self.patch_embed(images)))


class GaussianClassifier(_TokenViT):
    """ViT over Gaussian tokens: ``[B, k, 9]`` (+ optional ``valid`` ``[B, k]``) -> logits.

    Each Gaussian's 9 values are projected linearly to the width (the projection between the
    encoder's output and the classifier of Appendix A). Invalid slots are masked out of attention
    and pooling, so padding does not change the output.
    """

    def __init__(self, num_gaussians: int, num_classes: int, size: str | ViTSize = "tiny", pool: str = "cls",
                 in_dim: int = RAW_DIM):
        size = get_size(size)
        super().__init__(num_gaussians, num_classes, size, pool)
        self.num_gaussians, self.in_dim = num_gaussians, in_dim
        self.embed = nn.Linear(in_dim, size.width)
        init_weights(self)
        self._init_tokens()

    def forward(self, gaussians: Tensor, valid: Tensor | None = None) -> Tensor:
        if gaussians.ndim != 3 or gaussians.shape[1:] != (self.num_gaussians, self.in_dim):
            raise ValueError(f"gaussians: expected [B, {self.num_gaussians}, {self.in_dim}], "
                             f"got {tuple(gaussians.shape)}")
        return self.head(self.features(self.embed(gaussians), valid))


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


class GaussianEncoder(nn.Module):
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
