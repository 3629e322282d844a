"""Numba kernels of :func:`gvit.models.neighbours.neighbour_max` on CPU tensors.

One pass over the per-edge values without building them: for each point i and channel d, the
neighbour j that maximises ``values[j, d] + weight[d] . |colors[j] - colors[i]|`` (the first one on
a tie), its value, and the backward pass that sends each output's gradient to that neighbour alone.
Arrays are C-contiguous numpy, float32 or float64 (values, colors, weight and grad alike); index
``[B, k, K]`` int64; mask ``[B, k, K]`` bool. Images are independent, so the loops run in parallel
over the batch; the weight's gradient is summed per image, then over images (deterministic).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_OPTS = dict(nogil=True, cache=True, error_model="numpy")


@nb.njit(parallel=True, **_OPTS)
def forward(values, colors, index, mask, weight):
    """-> (out ``[B, k, D]``, source ``[B, k, D]`` int64: the winning neighbour per channel)."""
    n_img, k, dim = values.shape
    n_near, n_ch = index.shape[2], colors.shape[2]
    weight_t = np.ascontiguousarray(weight.T)  # [C, D]: the channel loop innermost and contiguous
    out = np.empty_like(values)
    source = np.empty((n_img, k, dim), dtype=np.int64)
    for b in nb.prange(n_img):
        best, edge = np.empty(dim, dtype=values.dtype), np.empty(dim, dtype=values.dtype)
        won = np.empty(dim, dtype=np.int64)
        for i in range(k):
            first = True
            for slot in range(n_near):
                stand_in = first and slot == n_near - 1  # no valid neighbour: the last slot's point, finite
                if not (mask[b, i, slot] or stand_in):
                    continue
                j = index[b, i, slot]
                edge[:] = 0.0
                for m in range(n_ch):
                    far = abs(colors[b, j, m] - colors[b, i, m])
                    for d in range(dim):
                        edge[d] += weight_t[m, d] * far
                for d in range(dim):
                    v = values[b, j, d] + edge[d]
                    better = first | (v > best[d])
                    best[d] = v if better else best[d]
                    won[d] = j if better else won[d]
                first = False
            out[b, i] = best
            source[b, i] = won
    return out, source


@nb.njit(parallel=True, **_OPTS)
def backward(grad, colors, source, weight):
    """Gradients of ``sum(grad * out)`` w.r.t. values ``[B, k, D]``, colors ``[B, k, C]``, weight ``[D, C]``."""
    n_img, k, dim = grad.shape
    n_ch = colors.shape[2]
    weight_t = np.ascontiguousarray(weight.T)  # [C, D]
    g_values = np.zeros_like(grad)
    g_colors = np.zeros_like(colors)
    g_weight = np.zeros((n_img, n_ch, dim), dtype=weight.dtype)
    for b in nb.prange(n_img):
        diff, pull = np.empty(dim, dtype=grad.dtype), np.empty(dim, dtype=grad.dtype)
        for i in range(k):
            for d in range(dim):
                g_values[b, source[b, i, d], d] += grad[b, i, d]
            for m in range(n_ch):
                own = 0.0
                for d in range(dim):  # d |c_j - c_i| / d c_j = sign(c_j - c_i), 0 at 0 (as torch's abs)
                    diff[d] = colors[b, source[b, i, d], m] - colors[b, i, m]
                    g_weight[b, m, d] += grad[b, i, d] * abs(diff[d])
                    pull[d] = grad[b, i, d] * weight_t[m, d] * ((diff[d] > 0) - (diff[d] < 0))
                    own += pull[d]
                g_colors[b, i, m] -= own
                for d in range(dim):
                    g_colors[b, source[b, i, d], m] += pull[d]
    return g_values, g_colors, np.ascontiguousarray(g_weight.sum(0).T)
