"""How many Gaussians an image keeps and where new ones go: luminance-aware pruning and the adaptive budget.

Both act on the fit's state in place: raw parameters ``[B, k, 9]`` and a ``valid`` mask ``[B, k]``
(slots that are off are skipped by the renderer), plus per-slot optimiser state. Index order is
compositing order, front to back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gaussians import Gaussians, decode
from ..render import render
from .init import gaussians_at_error

__all__ = ["LUMA", "GROW_WIDTH", "luminance_contribution", "prune_weak", "grow_schedule", "grow_round"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
GROW_WIDTH = 0.2  # adaptive budget: sigma of an added Gaussian, in mean spacings sqrt(H W / count) (pixels)


def luminance_contribution(gaussians: Gaussians, *, height: int, width: int, mode: str = "alpha",
                           backend: str = "auto") -> Tensor:
    """How much luminance each Gaussian puts into its render, ``[B, k]`` >= 0 (pixel units).

    E_i = |sum_p w_i(p) (Y(c_i) - Y(R_i(p)))|: the change of the image's total luminance Y
    (BT.601) if Gaussian i were removed, where w_i is its compositing weight and R_i the colour
    composited behind it. It equals |o_i * dY_total / do_i|, so one backward pass gives it for
    all Gaussians at once. In ``mode="sum"`` it is o_i Y(c_i) sum_p G_i(p). Invalid slots get 0.
    """
    g = gaussians
    opac = g.masked_opacities().detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = render(Gaussians(g.means.detach(), g.scales.detach(), g.angles.detach(), g.colors.detach(), opac),
                     height=height, width=width, mode=mode, backend=backend)
        luma = out.new_tensor(LUMA).view(1, 3, 1, 1)
        (grad,) = torch.autograd.grad((out * luma).sum(), opac)
    return (grad * opac).abs().detach()


def prune_weak(g: Gaussians, valid: Tensor, tau: float, render_kw: dict) -> Tensor:
    """``valid`` ``[b, k]`` less the Gaussians of ``g`` whose luminance contribution is below tau x their
    set's mean (each set's strongest is always kept, so no set is ever empty)."""
    contrib = luminance_contribution(g, **render_kw)
    mean = (contrib * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
    keep = valid & (contrib >= tau * mean)
    keep[torch.arange(len(keep)), contrib.argmax(1)] = True
    return keep


def grow_schedule(iters: int, grow_from: float, rounds: int, until: float) -> dict[int, float]:
    """The adaptive budget's rounds: step -> share of the k slots in use from that step on, rising
    evenly from ``grow_from`` to 1 over ``rounds`` rounds, the last at ``until`` x ``iters`` (at the
    last step at the latest, so every round runs; none when ``grow_from`` >= 1)."""
    if grow_from >= 1:
        return {}
    last = until * iters
    schedule: dict[int, float] = {}
    for r in range(1, rounds + 1):  # rounds that fall on the same step merge into the later share
        step = min(max(1, int(round(last * r / rounds))), max(iters - 1, 0))
        schedule[step] = grow_from + (1 - grow_from) * r / rounds
    return schedule


def grow_round(raw: Tensor, valid: Tensor, states: tuple[Tensor, ...], active: Tensor, target: Tensor, share: float,
               *, scale_factor: float, prune_tau: float, render_kw: dict, generator: torch.Generator,
               width: float = GROW_WIDTH) -> None:
    """One round of the adaptive budget, in place on the ``active`` images' rows: switch off the
    Gaussians whose luminance contribution is below ``prune_tau`` x the mean (0: none), then fill free
    slots up to ``share`` x k with Gaussians at the pixels where the render is most wrong
    (:func:`gvit.fit.init.gaussians_at_error`; sigma ``width`` x the mean spacing sqrt(H W / count)),
    in front of the others. ``states`` (optimiser
    moments, step counts; ``[B, k, ...]``) are zeroed for the new slots and reordered with them."""
    k = raw.shape[1]
    h, w = target.shape[-2:]
    g = decode(raw[active], scale_factor)
    g.valid = valid[active]
    if prune_tau > 0:
        valid[active] = prune_weak(g, valid[active], prune_tau, render_kw)
        g.valid = valid[active]
    error = (render(g, **render_kw) - target[active]).square().sum(1)  # [b, H, W]
    want = int(round(share * k))
    for row, img in enumerate(active.tolist()):
        free = (~valid[img]).nonzero().flatten()
        n = min(len(free), want - (k - len(free)))
        if n <= 0:
            continue
        slots = free[:n]
        raw[img, slots] = gaussians_at_error(target[img], error[row], n, width * math.sqrt(h * w / want),
                                             scale_factor=scale_factor, generator=generator)
        valid[img, slots] = True
        for state in states:
            state[img, slots] = 0
        new = torch.zeros(k, dtype=torch.bool, device=raw.device)
        new[slots] = True
        order = (~new).to(torch.int8).argsort(stable=True)  # the new ones first, the rest in their order
        for state in (raw, valid, *states):
            state[img] = state[img, order]
