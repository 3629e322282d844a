"""Vector quantisation with an EMA codebook (GaussianToken's quantiser, written for gvit).

Vectors ``x [..., dim]`` are replaced by their nearest code (Euclidean, no normalisation, no
projection) from a codebook ``[num_codes, dim]``:

* the codebook is initialised by k-means (``kmeans_iters`` Lloyd iterations) on the first training
  batch, then follows exponential moving averages of the vectors assigned to each code (``decay``;
  counts Laplace-smoothed with ``eps``), not gradients;
* codes whose EMA count falls below ``dead_below`` are re-seeded from random vectors of the batch
  at every training step;
* the encoder's gradient: the rotation trick (the code as a rotated and rescaled copy of x, the
  rotation and scale held constant; Fifty et al. 2024) or the straight-through estimator; the
  forward value is the code exactly either way;
* ``commitment`` * MSE(x, sg(code)) pulls the encoder toward its codes.

Buffers live in ``state_dict`` (codebook, EMA counts and sums, whether it is initialised), so a
checkpoint resumes the codebook exactly. Randomness (k-means seeds, re-seeding) comes from the
``generator`` passed to :meth:`VectorQuantizer.forward` or torch's global one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VectorQuantizer", "Quantized", "kmeans", "rotate_to", "code_statistics", "bits_per_index"]

GRADIENTS = ("rotation", "straight_through")


@dataclass
class Quantized:
    """What :meth:`VectorQuantizer.forward` returns: ``values`` (the codes, same shape as the input,
    differentiable in the input), ``indices`` (long, the input's shape without ``dim``) and the
    ``commitment`` loss (already weighted)."""

    values: Tensor
    indices: Tensor
    commitment: Tensor


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """k-means on ``x [N, dim]``: ``(centres [k, dim], counts [k])``. Seeded by k-means++ (each
    next centre drawn with probability proportional to its squared distance to the nearest chosen
    one; with fewer distinct vectors than k, the rest repeat vectors), then ``iters`` Lloyd
    iterations; an empty cluster keeps its centre."""
    n = len(x)
    if n == 0:
        raise ValueError("kmeans: no vectors")
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres[0] = x[first]
    nearest = ((x - x[first]) ** 2).sum(-1)
    for i in range(1, k):
        total = nearest.sum()
        if total > 0:
            pick = int(torch.multinomial((nearest / total).cpu().double(), 1, generator=generator))
        else:
            pick = int(torch.randint(n, (1,), generator=generator))
        centres[i] = x[pick]
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(-1))
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(max(1, iters)):
        assign = torch.cdist(x, centres).argmin(-1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres, counts


def rotate_to(x: Tensor, code: Tensor, eps: float = 1e-8) -> Tensor:
    """The rotation trick: ``code`` in the forward pass; in the backward pass the gradient reaches
    ``x`` through the rotation that takes x's direction to the code's and the ratio of their norms
    (both held constant), so a code's neighbourhood moves with x as a rotated copy of it."""
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    c_norm = code.norm(dim=-1, keepdim=True).clamp_min(eps)
    x_dir, c_dir = (x / x_norm).detach(), (code / c_norm).detach()
    r = F.normalize(x_dir + c_dir, dim=-1, eps=eps).detach()
    # R x = x - 2 (x.r) r + 2 (x.x_dir) c_dir, which takes x_dir to c_dir
    rotated = x - 2 * (x * r).sum(-1, keepdim=True) * r + 2 * (x * x_dir).sum(-1, keepdim=True) * c_dir
    out = rotated * (c_norm / x_norm).detach()
    return out + (code - out).detach()  # exactly the code (also where x and the code point apart)


def code_statistics(indices: Tensor, num_codes: int) -> dict:
    """``usage`` (fraction of the codes used at least once), ``perplexity`` (exp of the entropy of
    the code histogram, in codes) and the ``counts`` of ``indices``."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp()), "counts": counts}


class VectorQuantizer(nn.Module):
    """See the module docstring. ``x [..., dim]`` -> :class:`Quantized`."""

    def __init__(self, num_codes: int = 1024, dim: int = 3, *, decay: float = 0.8, eps: float = 1e-5,
                 kmeans_iters: int = 10, dead_below: float = 2.0, commitment: float = 0.25,
                 gradient: str = "rotation"):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"need num_codes >= 1 and dim >= 1, got {num_codes}, {dim}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.kmeans_iters, self.dead_below, self.commitment, self.gradient = (
            kmeans_iters,
            dead_below,
            commitment,
            gradient,
        )
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, gradient={self.gradient}"

    def nearest(self, x: Tensor) -> Tensor:
        """Indices of the nearest codes of ``x [..., dim]`` (Euclidean)."""
        flat = x.reshape(-1, self.dim).float()
        return torch.cdist(flat, self.codebook.float()).argmin(-1).view(x.shape[:-1])

    def lookup(self, indices: Tensor) -> Tensor:
        """The codes ``[..., dim]`` of ``indices``."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"indices must lie in [0, {self.num_codes}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        return self.codebook[indices.long()]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Quantized:
        if x.shape[-1] != self.dim:
            raise ValueError(f"quantizer: expected vectors of {self.dim} values, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim).float()
        if self.training:
            self._update(flat.detach(), generator)
        indices = self.nearest(x)
        codes = self.codebook[indices].to(x.dtype)
        values = rotate_to(x, codes) if self.gradient == "rotation" else x + (codes - x).detach()
        commitment = self.commitment * F.mse_loss(x, codes.detach())
        return Quantized(values, indices, commitment)

    @torch.no_grad()
    def _update(self, flat: Tensor, generator: torch.Generator | None) -> None:
        if not bool(self.initialised):
            centres, counts = kmeans(flat, self.num_codes, self.kmeans_iters, generator)
            self.codebook.copy_(centres)
            self.ema_count.copy_(counts)
            self.ema_sum.copy_(centres * counts[:, None])
            self.initialised.fill_(True)
        assign = torch.cdist(flat, self.codebook).argmin(-1)
        counts = torch.bincount(assign, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, assign, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_below
        if dead.any():  # re-seed from the batch; the new code starts with the threshold's count
            pick = torch.randint(len(flat), (int(dead.sum()),), generator=generator).to(flat.device)
            self.codebook[dead] = flat[pick]
            self.ema_count[dead] = self.dead_below
            self.ema_sum[dead] = flat[pick] * self.dead_below


def bits_per_index(num_codes: int) -> float:
    """Bits of one code index (log2 of the codebook size)."""
    return math.log2(num_codes)
