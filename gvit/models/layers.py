"""ViT building blocks (timm's layout): sizes, :class:`Attention`, :class:`Mlp`, :class:`Block`,
:class:`Transformer`, :class:`PatchEmbed` and the weight initialisation.

Sizes (:data:`SIZES`): ``micro`` and ``tiny`` train on a CPU; ``S`` and ``B`` are ViT-S and ViT-B
(width 384 / 768, depth 12, 6 / 12 heads). Weights: xavier_uniform for linear layers, LayerNorm
1/0 (as MAE and timm); position embeddings and class tokens are initialised by their models.
Attention runs through ``F.scaled_dot_product_attention`` and takes a key-padding mask, so Gaussian
sets of varying size (``valid`` masks) are handled exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = ["ViTSize", "SIZES", "get_size", "Attention", "Mlp", "DropPath", "set_drop_path_generator", "Block",
           "Transformer", "PatchEmbed", "init_weights", "TransformerModel", "norm_groups"]


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


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability ``rate``
    and kept ones are scaled by ``1 / (1 - rate)``; the identity in evaluation. The draws come from
    ``generator`` when one is set (:func:`set_drop_path_generator`: the training step's, so a resumed
    run draws what an uninterrupted one does), else from torch's global generator; they are made on
    the CPU and moved to the input's device."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {rate}")
        self.rate = rate
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = (torch.rand(x.shape[0], generator=self.generator) >= self.rate).to(x.device, x.dtype)
        return x * (keep / (1 - self.rate)).view(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def set_drop_path_generator(modules, generator: torch.Generator | None) -> None:
    """Make every :class:`DropPath` inside ``modules`` draw from ``generator`` (None: the global one)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, DropPath):
                m.generator = generator


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each branch under stochastic
    depth ``drop_path``. With ``last`` only the last ``last`` tokens are computed (they still attend to
    all): ``[B, last, D]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None, last: int | None = None) -> Tensor:
        x = (x if last is None else x[:, x.shape[1] - last:]) + self.drop_path(self.attn(self.norm1(x), mask, last))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """``depth`` blocks and a final LayerNorm. ``last``: return only the last ``last`` tokens,
    which the final block then computes alone (the same values, less work: the encoder keeps
    only its k Gaussian latents). ``drop_path``: the last block's stochastic depth rate, rising
    linearly from 0 at the first (timm's rule)."""

    def __init__(self, size: ViTSize, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        rates = [drop_path * i / max(size.depth - 1, 1) for i in range(size.depth)]
        self.blocks = nn.ModuleList([Block(size.width, size.heads, size.mlp_ratio, rate) for rate in rates])
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



class TransformerModel(nn.Module):
    """What optimisers and explanations need from a model built around ``self.transformer``
    (timm puts this knowledge on the model, so callers never match parameter names):

    * :meth:`no_weight_decay`: names of parameters kept out of weight decay besides biases and
      norms (position embeddings, class token, learned queries);
    * :attr:`num_layers` and :meth:`layer_id`: depth of each parameter for layer-wise lr decay
      (embeddings and tokens 0, block i -> i + 1, final norm and head ``depth + 1``);
    * :attr:`last_attention`: the attention module of the last block; its input are the tokens
      entering the last attention layer (after the block's LayerNorm).
    """

    transformer: Transformer
    _NO_DECAY = ("pos_embed", "cls_token", "queries")

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name in self._NO_DECAY}

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks) + 2

    def layer_id(self, name: str) -> int:
        if name.startswith("transformer.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("transformer.norm", "head")):
            return len(self.transformer.blocks) + 1
        return 0

    @property
    def last_attention(self) -> Attention:
        return self.transformer.blocks[-1].attn


def norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 8 where they divide, else their greatest common divisor with 8."""
    return math.gcd(channels, 8)
