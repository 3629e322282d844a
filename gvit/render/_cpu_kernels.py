"""Numba kernels of the tile-culled CPU rasterizer (see :mod:`gvit.render` for the spec).

Data handed in by :mod:`gvit.render._cpu`, all C-contiguous numpy arrays:

* ``params`` ``[B, k, 7]``: mean x, mean y, conic a, b, c (Sigma^-1 = [[a, b], [b, c]]),
  opacity, and the exponent below which alpha < 1/255 for sure, ln(1 / (255 o)) - 1e-3, in
  normalised coordinates. The last lets most far pixels skip ``exp``; the exact 1/255 test
  still decides every pixel that passes it.
* ``colors`` ``[B, k, C]``, ``background`` ``[B, C]``, in the caller's float dtype (float32 or
  float64), which is also the dtype of the image and of the colour/background gradients.

``params`` and all per-pixel arithmetic (offsets, exponent, alpha, transmittance,
accumulation) are float64 whatever the caller's dtype: a float32 conic of a needle-thin
Gaussian (axis ratio in the thousands) loses the exponent to cancellation, and float64 costs
nothing measurable in these scalar loops.
* ``tile_offsets`` ``[B * n_tiles + 1]`` int64 and ``tile_ids`` ``[n_isect]`` int32: the
  Gaussians overlapping tile ``t`` of image ``b`` are ``tile_ids[o[b*n_tiles+t] : o[...+1]]``,
  in index (front-to-back) order.

Forward keeps, per pixel, the final transmittance and the end of the run of list entries it
used, so the backward pass walks the same lists back to front and recovers every T_i by
division (as gsplat does on CUDA) instead of storing per-Gaussian state.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._spec import ALPHA_MAX, ALPHA_MIN, T_MIN

_OPTS = dict(nogil=True, cache=True, error_model="numpy")


@nb.njit(parallel=True, **_OPTS)
def bin_gaussians(params, extent, height, width, tile, n_tx, n_ty):
    """Per-tile lists of the Gaussians whose cull box touches the tile.

    ``extent`` ``[B, k, 2]``: half-widths of each Gaussian's box in normalised units (<= 0:
    never visible). The box is widened by one pixel, so the lists are a superset of the exact
    support; the kernels still apply the exact 1/255 test per pixel.
    """
    n_img, k = params.shape[0], params.shape[1]
    n_tiles = n_tx * n_ty
    counts = np.zeros(n_img * n_tiles, dtype=np.int64)
    boxes = np.empty((n_img, k, 4), dtype=np.int64)  # tx0, tx1, ty0, ty1; empty: tx0 > tx1, ty0 > ty1
    for b in nb.prange(n_img):
        for g in range(k):
            boxes[b, g, 0], boxes[b, g, 1], boxes[b, g, 2], boxes[b, g, 3] = 1, 0, 1, 0
            ex, ey = extent[b, g, 0], extent[b, g, 1]
            if not (ex > 0.0 and ey > 0.0):
                continue
            # pixel column j has x = (2j+1)/W - 1  ->  j = (x+1) W/2 - 1/2
            x0 = math.floor((params[b, g, 0] - ex + 1.0) * 0.5 * width - 0.5) - 1
            x1 = math.ceil((params[b, g, 0] + ex + 1.0) * 0.5 * width - 0.5) + 1
            y0 = math.floor((params[b, g, 1] - ey + 1.0) * 0.5 * height - 0.5) - 1
            y1 = math.ceil((params[b, g, 1] + ey + 1.0) * 0.5 * height - 0.5) + 1
            if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
                continue
            tx0, tx1 = max(x0, 0) // tile, min(x1, width - 1) // tile
            ty0, ty1 = max(y0, 0) // tile, min(y1, height - 1) // tile
            boxes[b, g, 0], boxes[b, g, 1], boxes[b, g, 2], boxes[b, g, 3] = tx0, tx1, ty0, ty1
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    counts[b * n_tiles + ty * n_tx + tx] += 1
    offsets = np.zeros(n_img * n_tiles + 1, dtype=np.int64)
    for i in range(n_img * n_tiles):
        offsets[i + 1] = offsets[i] + counts[i]
    ids = np.empty(offsets[-1], dtype=np.int32)
    for b in nb.prange(n_img):
        cursor = offsets[b * n_tiles:(b + 1) * n_tiles].copy()
        for g in range(k):
            for ty in range(boxes[b, g, 2], boxes[b, g, 3] + 1):
                for tx in range(boxes[b, g, 0], boxes[b, g, 1] + 1):
                    t = ty * n_tx + tx
                    ids[cursor[t]] = g
                    cursor[t] += 1
    return offsets, ids


@nb.njit(inline="always")
def _power(params, b, g, xn, yn):
    dx = xn - params[b, g, 0]
    dy = yn - params[b, g, 1]
    return dx, dy, -0.5 * (params[b, g, 2] * dx * dx + params[b, g, 4] * dy * dy) - params[b, g, 3] * dx * dy


@nb.njit(parallel=True, **_OPTS)
def forward(params, colors, background, tile_offsets, tile_ids, height, width, tile, n_tx, n_ty, sum_mode):
    """Render ``[B, C, H, W]``; also returns T_end ``[B, H, W]`` and the list end used ``[B, H, W]``."""
    n_img, n_ch = colors.shape[0], colors.shape[2]
    n_tiles = n_tx * n_ty
    dt = colors.dtype
    out = np.empty((n_img, n_ch, height, width), dtype=dt)
    t_end = np.empty((n_img, height, width), dtype=np.float64)
    last = np.empty((n_img, height, width), dtype=np.int64)
    for item in nb.prange(n_img * n_tiles):
        b = item // n_tiles
        t = item - b * n_tiles
        ty, tx = t // n_tx, t - (t // n_tx) * n_tx
        start, stop = tile_offsets[item], tile_offsets[item + 1]
        acc = np.empty(n_ch, dtype=np.float64)
        for i in range(ty * tile, min((ty + 1) * tile, height)):
            yn = (2 * i + 1) / height - 1.0
            for j in range(tx * tile, min((tx + 1) * tile, width)):
                xn = (2 * j + 1) / width - 1.0
                acc[:] = 0
                trans = 1.0
                end = start
                for p in range(start, stop):
                    g = tile_ids[p]
                    _, _, power = _power(params, b, g, xn, yn)
                    if power < params[b, g, 6] or power > 0:
                        continue
                    alpha = params[b, g, 5] * math.exp(power)
                    if alpha < ALPHA_MIN:
                        continue
                    if sum_mode:
                        for c in range(n_ch):
                            acc[c] += alpha * colors[b, g, c]
                        end = p + 1
                        continue
                    alpha = min(alpha, ALPHA_MAX)
                    next_t = trans * (1.0 - alpha)
                    if next_t <= T_MIN:
                        break
                    w = alpha * trans
                    for c in range(n_ch):
                        acc[c] += w * colors[b, g, c]
                    trans = next_t
                    end = p + 1
                bg_w = 1.0 if sum_mode else trans
                for c in range(n_ch):
                    out[b, c, i, j] = acc[c] + bg_w * background[b, c]
                t_end[b, i, j] = trans
                last[b, i, j] = end
    return out, t_end, last


@nb.njit(parallel=True, **_OPTS)
def backward(params, colors, background, tile_offsets, tile_ids, height, width, tile, n_tx, n_ty, sum_mode,
             t_end, last, grad_out, chunk_items, chunk_slot, n_slots):
    """Gradients of sum(grad_out * out) w.r.t. params ``[B, k, :6]``, colors and background.

    Work items (image, tile) are split into chunks ``chunk_items[c] : chunk_items[c+1]``; chunk
    ``c`` accumulates into buffer ``chunk_slot[c]``. Chunks that share a slot must touch
    disjoint images, so the sum is race-free and deterministic for a given chunking.
    """
    n_img, k, n_ch = colors.shape[0], colors.shape[1], colors.shape[2]
    n_tiles = n_tx * n_ty
    dt = colors.dtype
    g_params = np.zeros((n_slots, n_img, k, 6), dtype=np.float64)
    g_colors = np.zeros((n_slots, n_img, k, n_ch), dtype=dt)
    g_bg = np.zeros((n_slots, n_img, n_ch), dtype=dt)
    n_chunks = chunk_items.shape[0] - 1
    for chunk in nb.prange(n_chunks):
        s = chunk_slot[chunk]
        behind = np.empty(n_ch, dtype=np.float64)
        gout = np.empty(n_ch, dtype=np.float64)
        for item in range(chunk_items[chunk], chunk_items[chunk + 1]):
            b = item // n_tiles
            t = item - b * n_tiles
            ty, tx = t // n_tx, t - (t // n_tx) * n_tx
            start = tile_offsets[item]
            for i in range(ty * tile, min((ty + 1) * tile, height)):
                yn = (2 * i + 1) / height - 1.0
                for j in range(tx * tile, min((tx + 1) * tile, width)):
                    xn = (2 * j + 1) / width - 1.0
                    trans = t_end[b, i, j]
                    for c in range(n_ch):
                        gout[c] = grad_out[b, c, i, j]
                        behind[c] = background[b, c]
                        g_bg[s, b, c] += gout[c] * (1.0 if sum_mode else trans)
                    for p in range(last[b, i, j] - 1, start - 1, -1):
                        g = tile_ids[p]
                        dx, dy, power = _power(params, b, g, xn, yn)
                        if power < params[b, g, 6] or power > 0:
                            continue
                        gauss = math.exp(power)
                        alpha = params[b, g, 5] * gauss
                        if alpha < ALPHA_MIN:
                            continue
                        d_alpha = 0.0
                        if sum_mode:
                            for c in range(n_ch):
                                g_colors[s, b, g, c] += alpha * gout[c]
                                d_alpha += colors[b, g, c] * gout[c]
                        else:
                            clamped = alpha > ALPHA_MAX
                            if clamped:
                                alpha = ALPHA_MAX
                            trans = trans / (1.0 - alpha)
                            w = alpha * trans
                            for c in range(n_ch):
                                g_colors[s, b, g, c] += w * gout[c]
                                d_alpha += (colors[b, g, c] - behind[c]) * gout[c]
                                behind[c] = alpha * colors[b, g, c] + (1.0 - alpha) * behind[c]
                            if clamped:
                                continue
                            d_alpha *= trans
                        # alpha = o * exp(power): d/do = exp(power), d/dpower = alpha
                        g_params[s, b, g, 5] += d_alpha * gauss
                        d_pow = d_alpha * alpha
                        a, bb, cc = params[b, g, 2], params[b, g, 3], params[b, g, 4]
                        g_params[s, b, g, 0] += d_pow * (a * dx + bb * dy)
                        g_params[s, b, g, 1] += d_pow * (bb * dx + cc * dy)
                        g_params[s, b, g, 2] -= 0.5 * d_pow * dx * dx
                        g_params[s, b, g, 3] -= d_pow * dx * dy
                        g_params[s, b, g, 4] -= 0.5 * d_pow * dy * dy
    return g_params, g_colors, g_bg
