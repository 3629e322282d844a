"""What a guidance phase did to a GViT's Gaussians: the encoders at the phase's start, at its end and
(with ``guidance_control``) at the end of its gamma = 0 control, compared on the same images and g0,
for the encoder's Gaussians and for those the classifier reads after test-time fitting.

Conventions: shifts are mean distances between the centres of the same Gaussians (the same g0 query),
in pixels of the evaluated images (normalised units times half the longer side), averaged over the
Gaussians of an image and then over images; object shares are :func:`gvit.explain.object_share`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import dataset_masks
from ..explain import object_share

__all__ = ["gaussians_compared", "SHIFTS", "SHARES"]

# key -> (the encoder that moved, the one it is measured from)
SHIFTS = {"guidance_shift_px": ("guided", "before"), "control_shift_px": ("control", "before"),
          "guidance_vs_control_px": ("guided", "control")}
# encoder -> key of its share of opacity on the object
SHARES = {"guided": "object_share", "before": "object_share_before_guidance", "control": "object_share_control"}


@torch.no_grad()
def gaussians_compared(model: nn.Module, encoders: dict[str, nn.Module], dataset, collate, *, batch_size: int,
                       seed: int, device: torch.device) -> dict:
    """:data:`SHIFTS` and (images with object masks) :data:`SHARES` of a :class:`gvit.models.GViT`'s
    ``encoders`` (``"before"``, ``"guided"`` and optionally ``"control"``, in eval mode) on ``dataset``,
    g0 drawn from ``seed``; each key also with the prefix ``fitted_``, measured on the Gaussians after
    the model's test-time fitting (:meth:`gvit.models.GViT.refine`)."""
    masks = dataset_masks(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    gen, seen, shifts, shares = torch.Generator().manual_seed(seed), 0, {}, {}
    for images, _ in loader:
        images = images.to(device)
        g0 = model.sample_g0(len(images), gen)  # None for learned queries
        raw = {name: encoder(images, g0) for name, encoder in encoders.items()}
        views = {"": {n: model.decode(g) for n, g in raw.items()},
                 "fitted_": {n: model.decode(model.refine(images, g)) for n, g in raw.items()}}
        pixels = max(images.shape[-2:]) / 2  # normalised units -> pixels
        for prefix, g in views.items():
            for key, (a, b) in SHIFTS.items():
                if a in g and b in g:
                    distance = (g[a].means - g[b].means).norm(dim=-1).mean(1) * pixels
                    shifts.setdefault(prefix + key, []).append(distance.cpu())
            if masks is not None:
                batch_masks = masks[seen:seen + len(images)].to(device)
                for name, gaussians in g.items():
                    shares.setdefault(prefix + SHARES[name], []).append(object_share(gaussians, batch_masks).cpu())
        seen += len(images)
    out = {key: float(torch.cat(values).mean()) for key, values in shifts.items()}
    return out | {key: float(torch.cat(values).nanmean()) for key, values in shares.items()}
