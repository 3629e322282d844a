"""Local geometry for Gaussian tokens: before the transformer relates all Gaussians, each one reads
its ``count`` nearest neighbours (an EdgeConv layer, as DGCNN does for point clouds).

A transformer over Gaussian tokens has to learn from data which Gaussians lie next to which; a
shape is an arrangement of neighbours (an edge, a corner, a curve), so giving every token its
neighbourhood up front is what lets a small classifier learn shapes in a few hundred steps.

Conventions: centres in normalised coordinates ([-1, 1], x right, y down); neighbours are the
nearest valid centres by Euclidean distance, the Gaussian itself excluded; relative positions
are measured in ``spacing`` units (the classifier uses the grid spacing of k cells, 2 / sqrt(k)).

One layer, for token features x ``[B, k, D]`` and the neighbour set N(i)::

    h = LayerNorm(x)
    x_i <- x_i + W2 gelu(A h_i - B h_i + max_{j in N(i)} (B h_j + E e_ij))

(``pool="point"``: the max before the activation and the output map after it, so both run once
per point rather than per edge). ``pool="edge"`` takes the max over per-edge activations, as DGCNN
does, ``W2 max_{j in N(i)} gelu(A h_i + B (h_j - h_i) + E e_ij)``, building the per-edge tensor
``[B, k, K, D]`` (the ablation of that choice; the two differ only where gelu is not increasing).

with the edge features e_ij = ((mu_j - mu_i) / spacing, c_j - c_i, |c_j - c_i|) (c: colour).

How it is computed: E e_ij splits into a part linear in the endpoints, o_j - o_i with o = E_pos mu /
spacing + E_col c, and E_abs |c_j - c_i|; so the max is ``max_j (B h_j + o_j + E_abs |c_j - c_i|) - o_i``
(:func:`neighbour_max`), and of the per-edge values only the maximising neighbour of each channel
enters the gradient. On CPU, numba kernels (:mod:`gvit.models._neighbour_kernels`) find the winners
in one pass without building the per-edge values and send each gradient to its winner; elsewhere
(:func:`neighbour_max_torch`) the per-edge tensor ``[B, k, K, D]`` is built once without autograd
and the backward pass touches ``[B, k, D]`` gathers. Both are tested against the layer over the
per-edge tensor with autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..gaussians import Gaussians
from . import _neighbour_kernels as K

__all__ = ["nearest_neighbours", "edge_features", "neighbour_max", "neighbour_max_torch", "NeighbourLayer", "EDGE_DIM"]

EDGE_DIM = 8


def nearest_neighbours(points: Tensor, count: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``count`` nearest other points of each point: ``(index [B, k, count] long, mask [B, k, count]
    bool)``; ``mask`` is False where a point has fewer than ``count`` valid others (those slots hold
    an arbitrary index). Invalid points are never neighbours."""
    b, k, _ = points.shape
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    dist = torch.cdist(points.detach(), points.detach())
    dist = dist + torch.diag_embed(torch.full((b, k), float("inf"), dtype=dist.dtype, device=dist.device))
    if valid is not None:
        dist = dist.masked_fill(~valid[:, None, :], float("inf"))
    take = min(count, k)
    near, index = dist.topk(take, dim=-1, largest=False)
    mask = torch.isfinite(near)
    if take < count:  # fewer points than neighbours asked for: pad with masked slots
        index = F.pad(index, (0, count - take))
        mask = F.pad(mask, (0, count - take), value=False)
    return index, mask


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, k, C]`` at ``index [B, k, K]`` -> ``[B, k, K, C]``."""
    b, k, c = values.shape
    flat = (index + torch.arange(b, device=index.device)[:, None, None] * k).reshape(-1)
    return values.reshape(b * k, c)[flat].view(*index.shape, c)


def edge_features(gaussians: Gaussians, index: Tensor, spacing: float) -> Tensor:
    """``[B, k, K, EDGE_DIM]``: relative centre (in ``spacing`` units), colour difference and its
    magnitude (the e_ij of the module docstring, as a tensor: what :class:`NeighbourLayer` computes
    with, without building it)."""
    rel = (_gather(gaussians.means, index) - gaussians.means[:, :, None]) / spacing
    dc = _gather(gaussians.colors, index) - gaussians.colors[:, :, None]
    return torch.cat([rel, dc, dc.abs()], -1)


def neighbour_max(values: Tensor, colors: Tensor, index: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    """``[B, k, D]``: for each point i and channel d, the max over its valid neighbours j of
    ``values[j, d] + weight[d] . |colors[j] - colors[i]|`` (``values [B, k, D]``, ``colors [B, k, C]``,
    ``weight [D, C]``; ``index``, ``mask`` from :func:`nearest_neighbours`). The gradient is amax's
    (all of it to the maximising neighbour); a point without a valid neighbour gets an arbitrary
    finite value. CPU tensors in float32 or float64 go through numba kernels that never build the
    per-edge values; anything else through :func:`neighbour_max_torch`."""
    dtypes = (torch.float32, torch.float64)
    if values.device.type == "cpu" and values.dtype in dtypes and colors.dtype == weight.dtype == values.dtype:
        return _NeighbourMax.apply(values, colors, index, mask, weight)
    return neighbour_max_torch(values, colors, index, mask, weight)


class _NeighbourMax(torch.autograd.Function):
    """:func:`neighbour_max` on CPU through the numba kernels; the winners are kept for backward."""

    @staticmethod
    def forward(ctx, values, colors, index, mask, weight):
        def arr(t):
            return t.detach().contiguous().numpy()

        colors_np, weight_np = arr(colors), arr(weight)
        out, source = K.forward(arr(values), colors_np, arr(index.long()), arr(mask), weight_np)
        ctx.state = (colors_np, source, weight_np)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        colors_np, source, weight_np = ctx.state
        g_values, g_colors, g_weight = K.backward(grad.detach().contiguous().numpy(), colors_np, source, weight_np)
        return torch.from_numpy(g_values), torch.from_numpy(g_colors), None, None, torch.from_numpy(g_weight)


def neighbour_max_torch(values: Tensor, colors: Tensor, index: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    """:func:`neighbour_max` in PyTorch ops, on any device and dtype: the per-edge tensor
    ``[B, k, K, D]`` built once without autograd, the gradient through ``[B, k, D]`` gathers."""
    with torch.no_grad():
        far = (_gather(colors, index) - colors[:, :, None]).abs().to(values.dtype)
        every = _gather(values, index) + far @ weight.to(values.dtype).T  # [B, k, K, D]
        if not bool(mask.all()):
            every.masked_fill_(~mask[..., None], float("-inf"))
        source = index.gather(2, every.max(2).indices)  # [B, k, D]: the neighbour that wins each channel
    picked = values.gather(1, source)
    b, k, d = source.shape
    for m in range(colors.shape[-1]):  # per colour channel: gathers of [B, k, D] (a scatter-add backward)
        channel = colors[..., m]
        far = (channel.gather(1, source.view(b, k * d)).view(b, k, d) - channel[..., None]).abs()
        picked = picked + (far * weight[:, m]).to(picked.dtype)
    return picked


class NeighbourLayer(nn.Module):
    """One EdgeConv layer (see the module docstring): ``x [B, k, D]`` -> ``[B, k, D]``, given the
    centres in spacing units ``positions [B, k, 2]``, ``colors [B, k, 3]`` and the neighbourhoods
    ``index``, ``mask`` of :func:`nearest_neighbours`; ``pool``: ``"point"`` or ``"edge"`` (the
    module docstring)."""

    def __init__(self, dim: int, pool: str = "point"):
        super().__init__()
        if pool not in ("point", "edge"):
            raise ValueError(f"pool must be 'point' or 'edge', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.node = nn.Linear(dim, 2 * dim)
        self.edge = nn.Linear(EDGE_DIM, dim, bias=False)  # E, over e_ij = (relative centre, dc, |dc|)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, positions: Tensor, colors: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        centre, other = self.node(self.norm(x)).chunk(2, -1)
        w_pos, w_col, w_abs = self.edge.weight.split((2, 3, 3), dim=1)
        own = positions.to(x.dtype) @ w_pos.T + colors.to(x.dtype) @ w_col.T  # o: E e_ij = o_j - o_i + E_abs |dc|
        has = mask.any(-1, keepdim=True)  # a point with no valid neighbour gets no message
        if self.pool == "edge":
            far = (_gather(colors, index) - colors[:, :, None]).abs().to(x.dtype)
            edges = (centre - other - own)[:, :, None] + _gather(other + own, index) + far @ w_abs.T
            hidden = F.gelu(edges).masked_fill(~mask[..., None], float("-inf")).amax(2)
            hidden = torch.where(has, hidden, torch.zeros_like(hidden))
        else:
            pooled = neighbour_max(other + own, colors, index, mask, w_abs) - own
            hidden = F.gelu(centre - other + torch.where(has, pooled, torch.zeros_like(pooled)))
        return x + torch.where(has, self.out(hidden), torch.zeros_like(hidden))
