"""Autograd wrapper around the numba kernels: torch tensors in, torch tensors out."""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _cpu_kernels as K


def default_tile_size(height: int, width: int) -> int:
    """8-pixel tiles: measured fastest at 32x32 and 224x224 (bench/render.py --tile-sizes)."""
    return 8


def _chunks(n_img: int, n_tiles: int, n_threads: int):
    """Split the (image, tile) work items of the backward pass into chunks and buffer slots.

    With at least as many images as chunks, chunks hold whole images and share one buffer
    (their Gaussians are disjoint); otherwise each chunk gets its own buffer.
    """
    n_items = n_img * n_tiles
    n_chunks = max(1, min(n_items, 4 * n_threads))
    if n_img >= n_chunks:
        bounds = np.linspace(0, n_img, n_chunks + 1).round().astype(np.int64) * n_tiles
        return bounds, np.zeros(n_chunks, dtype=np.int64), 1
    bounds = np.linspace(0, n_items, n_chunks + 1).round().astype(np.int64)
    return bounds, np.arange(n_chunks, dtype=np.int64), n_chunks


class CpuRasterize(torch.autograd.Function):
    """means [B,k,2], conics [B,k,3], colors [B,k,C], opacities [B,k], background [B,C],
    extent [B,k,2] (cull half-widths, no gradient) -> image [B,C,H,W] in the colours' dtype."""

    @staticmethod
    def forward(ctx, means, conics, colors, opacities, background, extent, height, width, sum_mode, tile):
        """means, conics, opacities: float64 (geometry); colors, background: float32 or float64."""
        np_dtype = np.float64 if colors.dtype == torch.float64 else np.float32

        def arr(t, dtype):
            return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)

        opac = arr(opacities, np.float64)[..., None]
        with np.errstate(divide="ignore"):
            reject = -np.log(255.0 * opac) - 1e-3
        params = np.concatenate([arr(means, np.float64), arr(conics, np.float64), opac, reject], axis=-1)
        colors_np, bg_np = arr(colors, np_dtype), arr(background, np_dtype)
        n_tx, n_ty = -(-width // tile), -(-height // tile)
        offsets, ids = K.bin_gaussians(params, arr(extent, np.float64), height, width, tile, n_tx, n_ty)
        out, t_end, last = K.forward(params, colors_np, bg_np, offsets, ids, height, width, tile, n_tx, n_ty, sum_mode)
        ctx.state = (params, colors_np, bg_np, offsets, ids, height, width, tile, n_tx, n_ty, sum_mode, t_end, last)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        params, colors_np, bg_np, offsets, ids, height, width, tile, n_tx, n_ty, sum_mode, t_end, last = ctx.state
        grad_np = np.ascontiguousarray(grad_out.detach().cpu().numpy(), dtype=colors_np.dtype)
        bounds, slots, n_slots = _chunks(params.shape[0], n_tx * n_ty, numba.get_num_threads())
        g_params, g_colors, g_bg = K.backward(
            params, colors_np, bg_np, offsets, ids, height, width, tile, n_tx, n_ty, sum_mode,
            t_end, last, grad_np, bounds, slots, n_slots,
        )
        g_params = torch.from_numpy(g_params.sum(0) if n_slots > 1 else g_params[0])
        g_colors = torch.from_numpy(g_colors.sum(0) if n_slots > 1 else g_colors[0])
        g_bg = torch.from_numpy(g_bg.sum(0) if n_slots > 1 else g_bg[0])
        return g_params[..., 0:2], g_params[..., 2:5], g_colors, g_params[..., 5], g_bg, None, None, None, None, None
