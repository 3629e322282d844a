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
Gaussian (axis ratio in the thousands) loses the exponent to cancellation.
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


# exp on [-5.6, 0], the range the kernels take it on (a power below ln(1/255) is rejected first):
# exp(x) = exp(x/16)^16, exp(x/16) by its degree-12 Taylor polynomial (|x/16| <= 0.35), relative
# error under 1e-14 there (tested). Unlike math.exp (a libm call), it vectorises over a tile's pixels.
_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(13))


@nb.njit(inline="always")
def _exp(x):
    r = x * 0.0625
    e = _EXP_TAYLOR[12]
    for n in range(11, -1, -1):
        e = e * r + _EXP_TAYLOR[n]
    e = e * e
    e = e * e
    e = e * e
    return e * e


@nb.njit(inline="always")
def _falloff(dx, dy, ca, cb, cc, reject):
    """``(inside, exp(power))`` of a Gaussian with conic (ca, cb, cc) at offset (dx, dy) from its centre:
    ``inside`` False where the exponent is below ``reject`` or positive (the pixel is skipped; the
    exp is then taken of 0, so it stays finite)."""
    power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
    inside = (power >= reject) & (power <= 0.0)
    return inside, _exp(power if inside else 0.0)


@nb.njit(inline="always")
def _tile_pixels(ty, tx, tile, height, width, xs, ys):
    """Tile (ty, tx)'s pixel centres, row-major, into xs, ys; returns its first row and column, its
    width and its pixel count."""
    i0, j0 = ty * tile, tx * tile
    i1, j1 = min(i0 + tile, height), min(j0 + tile, width)
    n = 0
    for i in range(i0, i1):
        for j in range(j0, j1):
            xs[n] = (2 * j + 1) / width - 1.0
            ys[n] = (2 * i + 1) / height - 1.0
            n += 1
    return i0, j0, j1 - j0, n


# Both kernels take a tile's list Gaussian by Gaussian, with the tile's pixels in inner loops
# free of branches (the per-pixel state in small arrays: transmittance, colour so far, the list
# end used, stopped or not), so the inner loops vectorise. What each pixel computes is the spec's
# front-to-back loop unchanged: a pixel that has stopped takes nothing more.


@nb.njit(parallel=True, fastmath={"contract"}, **_OPTS)
def forward(params, colors, background, tile_offsets, tile_ids, height, width, tile, n_tx, n_ty, sum_mode):
    """Render ``[B, C, H, W]``; also returns T_end ``[B, H, W]`` and the list end used ``[B, H, W]``."""
    n_img, n_ch = colors.shape[0], colors.shape[2]
    n_tiles = n_tx * n_ty
    out = np.empty((n_img, n_ch, height, width), dtype=colors.dtype)
    t_end = np.empty((n_img, height, width), dtype=np.float64)
    last = np.empty((n_img, height, width), dtype=np.int64)
    size = tile * tile
    for item in nb.prange(n_img * n_tiles):
        b = item // n_tiles
        t = item - b * n_tiles
        ty, tx = t // n_tx, t - (t // n_tx) * n_tx
        start, stop = tile_offsets[item], tile_offsets[item + 1]
        xs, ys = np.empty(size), np.empty(size)
        i0, j0, tw, n = _tile_pixels(ty, tx, tile, height, width, xs, ys)
        trans, weight, acc = np.ones(n), np.empty(n), np.zeros((n_ch, n))
        end = np.full(n, start, dtype=np.int64)
        live = np.ones(n, dtype=np.int64)
        for p in range(start, stop):
            g = tile_ids[p]
            mx, my, ca, cb, cc = params[b, g, 0], params[b, g, 1], params[b, g, 2], params[b, g, 3], params[b, g, 4]
            opacity, reject = params[b, g, 5], params[b, g, 6]
            alive = 0
            for q in range(n):
                inside, e = _falloff(xs[q] - mx, ys[q] - my, ca, cb, cc, reject)
                alpha = opacity * e
                take = inside & (alpha >= ALPHA_MIN) & (live[q] > 0)
                if not sum_mode:
                    alpha = min(alpha, ALPHA_MAX)
                    next_t = trans[q] * (1.0 - alpha)
                    live[q] = 0 if (take & (next_t <= T_MIN)) else live[q]
                    take = take & (next_t > T_MIN)
                    alpha = alpha * trans[q]
                    trans[q] = next_t if take else trans[q]
                weight[q] = alpha if take else 0.0
                end[q] = p + 1 if take else end[q]
                alive += live[q]
            for c in range(n_ch):
                col = colors[b, g, c]
                for q in range(n):
                    acc[c, q] += weight[q] * col
            if alive == 0:
                break
        for q in range(n):
            i, j = i0 + q // tw, j0 + q % tw
            bg_w = 1.0 if sum_mode else trans[q]
            for c in range(n_ch):
                out[b, c, i, j] = acc[c, q] + bg_w * background[b, c]
            t_end[b, i, j] = trans[q]
            last[b, i, j] = end[q]
    return out, t_end, last


@nb.njit(parallel=True, fastmath={"contract", "reassoc"}, **_OPTS)
def backward(params, colors, background, tile_offsets, tile_ids, height, width, tile, n_tx, n_ty, sum_mode,
             t_end, last, grad_out, chunk_items, chunk_slot, n_slots):
    """Gradients of sum(grad_out * out) w.r.t. params ``[B, k, :6]``, colors and background.

    Each pixel walks its list back to front from the end it used, recovering T_i by division.
    Work items (image, tile) are split into chunks ``chunk_items[c] : chunk_items[c+1]``; chunk
    ``c`` accumulates into buffer ``chunk_slot[c]``. Chunks that share a slot must touch
    disjoint images, so the sum is race-free and deterministic for a given chunking.
    """
    n_img, k, n_ch = colors.shape[0], colors.shape[1], colors.shape[2]
    n_tiles = n_tx * n_ty
    g_params = np.zeros((n_slots, n_img, k, 6), dtype=np.float64)
    g_colors = np.zeros((n_slots, n_img, k, n_ch), dtype=colors.dtype)
    g_bg = np.zeros((n_slots, n_img, n_ch), dtype=colors.dtype)
    size = tile * tile
    for chunk in nb.prange(chunk_items.shape[0] - 1):
        s = chunk_slot[chunk]
        xs, ys, dxs, dys = np.empty(size), np.empty(size), np.empty(size), np.empty(size)
        trans, used = np.empty(size), np.empty(size, dtype=np.int64)
        gout, behind = np.empty((n_ch, size)), np.empty((n_ch, size))
        # per pixel, for the current Gaussian: its exp(power), its weight in the output, the alpha
        # that blends the colour behind it, T_i where alpha gets a gradient (else 0), d out / d alpha
        gauss, weight, blend = np.empty(size), np.empty(size), np.empty(size)
        t_i, d_alpha = np.empty(size), np.empty(size)
        for item in range(chunk_items[chunk], chunk_items[chunk + 1]):
            b = item // n_tiles
            t = item - b * n_tiles
            ty, tx = t // n_tx, t - (t // n_tx) * n_tx
            start = tile_offsets[item]
            i0, j0, tw, n = _tile_pixels(ty, tx, tile, height, width, xs, ys)
            top = start
            for q in range(n):
                trans[q] = t_end[b, i0 + q // tw, j0 + q % tw]
                used[q] = last[b, i0 + q // tw, j0 + q % tw]
                top = max(top, used[q])
            for c in range(n_ch):
                # behind a Gaussian: the colour the pixel would show without it and all in front
                bg_c, total = (0.0 if sum_mode else background[b, c]), 0.0
                for q in range(n):
                    gout[c, q] = grad_out[b, c, i0 + q // tw, j0 + q % tw]
                    behind[c, q] = bg_c
                    total += gout[c, q] * (1.0 if sum_mode else trans[q])
                g_bg[s, b, c] += total
            for p in range(top - 1, start - 1, -1):
                g = tile_ids[p]
                mx, my, ca, cb, cc = params[b, g, 0], params[b, g, 1], params[b, g, 2], params[b, g, 3], params[b, g, 4]
                opacity, reject = params[b, g, 5], params[b, g, 6]
                for q in range(n):
                    dx, dy = xs[q] - mx, ys[q] - my
                    inside, e = _falloff(dx, dy, ca, cb, cc, reject)
                    alpha = opacity * e
                    take = inside & (alpha >= ALPHA_MIN) & (p < used[q])
                    dxs[q], dys[q], gauss[q], d_alpha[q] = dx, dy, e, 0.0
                    if sum_mode:
                        weight[q] = alpha if take else 0.0
                        blend[q] = 0.0
                        t_i[q] = 1.0 if take else 0.0
                    else:
                        capped = min(alpha, ALPHA_MAX)
                        before = trans[q] / (1.0 - capped)
                        trans[q] = before if take else trans[q]
                        weight[q] = capped * before if take else 0.0
                        blend[q] = capped if take else 0.0
                        t_i[q] = before if (take & (alpha <= ALPHA_MAX)) else 0.0  # a capped alpha: no gradient
                for c in range(n_ch):
                    col, g_col = colors[b, g, c], 0.0
                    for q in range(n):
                        g_col += weight[q] * gout[c, q]
                        d_alpha[q] += (col - behind[c, q]) * gout[c, q]
                        behind[c, q] += blend[q] * (col - behind[c, q])
                    g_colors[s, b, g, c] += g_col
                # alpha = o exp(power): d alpha / d o = exp(power), d alpha / d power = alpha
                g_mx = g_my = g_a = g_b = g_c = g_o = 0.0
                for q in range(n):
                    d_a = d_alpha[q] * t_i[q]
                    g_o += d_a * gauss[q]
                    d_pow = d_a * opacity * gauss[q]
                    dx, dy = dxs[q], dys[q]
                    g_mx += d_pow * (ca * dx + cb * dy)
                    g_my += d_pow * (cb * dx + cc * dy)
                    g_a -= 0.5 * d_pow * dx * dx
                    g_b -= d_pow * dx * dy
                    g_c -= 0.5 * d_pow * dy * dy
                g_params[s, b, g, 0] += g_mx
                g_params[s, b, g, 1] += g_my
                g_params[s, b, g, 2] += g_a
                g_params[s, b, g, 3] += g_b
                g_params[s, b, g, 4] += g_c
                g_params[s, b, g, 5] += g_o
    return g_params, g_colors, g_bg
