"""Classifiers over tokens: the patch ViT baseline and the Gaussian classifier (paper 2.2, Appendix A).

Both are a :class:`TokenViT`: learned position embeddings, an optional class token, a
:class:`~gvit.models.layers.Transformer` and a linear head over the class token or the mean of the
valid tokens. :class:`PatchViT` reads ``[B, 3, H, W]`` images as patches; :class:`GaussianClassifier`
reads raw Gaussians ``[B, k, 9]`` (one token per Gaussian, with an optional ``valid`` mask).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..gaussians import RAW_DIM, decode
from .features import splat_feature_dim, splat_features
from .neighbours import NeighbourLayer, nearest_neighbours
from .layers import Mlp, PatchEmbed, Transformer, TransformerModel, ViTSize, get_size, init_weights

__all__ = ["TokenViT", "PatchViT", "GaussianClassifier"]


class TokenViT(TransformerModel):
    """A transformer over ``num_tokens`` embedded tokens with learned position embeddings and
    an optional class token; the head reads the class token or the mean of the valid tokens.
    ``drop_path``: the transformer's stochastic depth (its last block's rate)."""

    def __init__(self, num_tokens: int, num_classes: int, size: ViTSize, pool: str, drop_path: float = 0.0):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        width = size.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + (pool == "cls"), width))  # class token's too
        self.transformer = Transformer(size, drop_path)
        self.head = nn.Linear(width, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the embedded inputs in the transformer's sequence (the class token)."""
        return int(self.cls_token is not None)

    def load_backbone(self, state_dict: dict) -> bool:
        """Load weights saved from a model of the same kind; the head only when its number of
        classes matches (else it keeps its fresh initialisation). Returns whether the head was loaded.
        ValueError when anything else does not match."""
        weights = dict(state_dict)
        head = weights.get("head.weight")
        keep_head = head is not None and head.shape[0] == self.num_classes
        if not keep_head:
            weights.pop("head.weight", None)
            weights.pop("head.bias", None)
        try:
            missing, unexpected = self.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"the weights do not fit this model ({str(exc).splitlines()[0]})") from None
        if unexpected or set(missing) - ({"head.weight", "head.bias"} if not keep_head else set()):
            raise ValueError(f"the weights do not fit this model (missing {missing}, unexpected {unexpected})")
        return keep_head

    def _init_tokens(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def features_of(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
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


class PatchViT(TokenViT):
    """The patch ViT baseline: ``[B, 3, H, W]`` -> logits ``[B, num_classes]``."""

    def __init__(self, image_size: int | tuple[int, int], patch: int, num_classes: int, size: str | ViTSize = "tiny",
                 pool: str = "cls", drop_path: float = 0.0):
        size = get_size(size)
        embed = PatchEmbed(image_size, patch, size.width)
        super().__init__(embed.num_patches, num_classes, size, pool, drop_path)
        self.patch_embed = embed
        init_weights(self)
        self._init_tokens()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features_of(self.patch_embed(images)))


class GaussianClassifier(TokenViT):
    """ViT over Gaussian tokens: ``[B, k, 9]`` (+ optional ``valid`` ``[B, k]``) -> logits.

    ``features="raw"``: each Gaussian's 9 raw values are projected linearly to the width (the
    projection between the encoder's output and the classifier of Appendix A).
    ``features="splat"``: an MLP on :func:`gvit.models.features.splat_features` (Fourier features of
    the centre, log-covariance, colour, opacity; decoded with ``scale_factor``), so tokens start
    from geometry and appearance rather than raw values.
    ``neighbours`` > 0: ``neighbour_layers`` EdgeConv layers (:mod:`gvit.models.neighbours`) give
    each token its ``neighbours`` nearest Gaussians before the transformer (local shape first),
    pooling per point or per edge (``neighbour_pool``).
    Invalid slots are masked out of attention, neighbourhoods and pooling, so padding does not
    change the output.
    """

    def __init__(self, num_gaussians: int, num_classes: int, size: str | ViTSize = "tiny", pool: str = "cls",
                 in_dim: int = RAW_DIM, *, features: str = "raw", frequencies: int = 6, scale_factor: float = 1.0,
                 neighbours: int = 0, neighbour_layers: int = 2, neighbour_pool: str = "point", drop_path: float = 0.0):
        size = get_size(size)
        super().__init__(num_gaussians, num_classes, size, pool, drop_path)
        if features not in ("raw", "splat"):
            raise ValueError(f"features must be 'raw' or 'splat', got {features!r}")
        if features == "splat" and in_dim != RAW_DIM:
            raise ValueError(f"splat features need raw Gaussians ({RAW_DIM} values), got in_dim={in_dim}")
        if neighbours < 0 or neighbour_layers < 0 or (neighbours and in_dim != RAW_DIM):
            raise ValueError(f"neighbours and neighbour_layers must be >= 0 (and neighbours need raw Gaussians), "
                             f"got {neighbours}, {neighbour_layers}, in_dim={in_dim}")
        self.num_gaussians, self.in_dim, self.features = num_gaussians, in_dim, features
        self.frequencies, self.scale_factor = frequencies, scale_factor
        if features == "raw":
            self.embed = nn.Linear(in_dim, size.width)
        else:
            self.embed = Mlp(splat_feature_dim(frequencies), size.width, size.width)
        self.neighbours = neighbours
        layers = neighbour_layers if neighbours else 0
        self.local = nn.ModuleList(NeighbourLayer(size.width, neighbour_pool) for _ in range(layers))
        init_weights(self)
        self._init_tokens()

    def neighbourhoods(self, gaussians: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Each token's ``neighbours`` nearest Gaussians, ``(index, mask)`` of
        :func:`gvit.models.neighbours.nearest_neighbours` over the decoded centres; None without a
        neighbour layer. A left-right flip of the Gaussians leaves them unchanged (distances are), so
        a cache of Gaussians can hold them once for :meth:`forward`."""
        if not len(self.local):
            return None
        return nearest_neighbours(decode(gaussians, self.scale_factor).means, self.neighbours, valid)

    def forward(self, gaussians: Tensor, valid: Tensor | None = None, *,
                neighbourhoods: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Logits ``[B, classes]``; ``neighbourhoods``: :meth:`neighbourhoods` of these Gaussians when
        already known (computed here otherwise)."""
        if gaussians.ndim != 3 or gaussians.shape[1:] != (self.num_gaussians, self.in_dim):
            raise ValueError(f"gaussians: expected [B, {self.num_gaussians}, {self.in_dim}], "
                             f"got {tuple(gaussians.shape)}")
        x = gaussians if self.features == "raw" else splat_features(gaussians, self.scale_factor, self.frequencies)
        x = self.embed(x)
        if len(self.local):
            g = decode(gaussians, self.scale_factor)
            if neighbourhoods is None:
                neighbourhoods = nearest_neighbours(g.means, self.neighbours, valid)
            index, mask = neighbourhoods
            positions = g.means / (2.0 / self.num_gaussians ** 0.5)  # in grid spacings
            for layer in self.local:
                x = layer(x, positions, g.colors, index, mask)
        return self.head(self.features_of(x, valid))
