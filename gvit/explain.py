"""Where the Gaussians went and which ones carried the decision (paper 4, Fig. 5).

* :func:`cdam`: Class-Discriminative Attention Map scores per Gaussian (after Brocki et al.):
  ``S_i = sum_j x_ij * d f_c / d x_ij`` with x the tokens fed to the classifier's last attention
  layer (in a pre-norm block: after its LayerNorm; the block's input itself would give S = 0 up to
  the LayerNorm's epsilon, since LayerNorm ignores a token's scale) and f_c the logit of class c.
* :func:`cell_map`: per-Gaussian values placed on a ``grid x grid`` map by the cell that holds
  each Gaussian's centre (values of Gaussians sharing a cell add up; empty cells are 0), the
  paper's 16x16 projection of CDAM.
* :func:`det_sigma_map`: the "shrinking-for-saliency" signal as an image: log det(Sigma) of the
  Gaussians, alpha-composited per pixel with the rasterizer (small values: small Gaussians).

Maps follow the image's orientation (row 0 at the top, :mod:`gvit.gaussians` conventions). This
module computes tensors only; ``gvit explain`` and ``gvit interpret`` (:mod:`gvit.tools`) draw
and tabulate them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussians import Gaussians, det_covariance
from .render import render

__all__ = ["cdam", "cell_map", "det_sigma_map", "explain_images", "rank_correlation", "object_share", "mask_mass",
           "cell_index"]


def cdam(classifier, g: Tensor, target: Tensor | int | None = None,
         valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CDAM scores ``[B, k]`` of raw Gaussians ``g [B, k, 9]`` for class ``target`` (an int, a
    ``[B]`` tensor, or None for each set's predicted class); returns ``(scores, target)``.

    ``classifier`` is a :class:`gvit.models.GaussianClassifier` (anything with ``last_attention``
    and ``num_prefix_tokens``); the class token (when there is one) gets no score. The classifier's
    weights receive no gradient.
    """
    captured = {}

    def keep_input(module, args):
        x = args[0]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        captured["x"] = x
        return (x, *args[1:])

    handle = classifier.last_attention.register_forward_pre_hook(keep_input)
    try:
        with torch.enable_grad():
            logits = classifier(g.detach(), valid)
            if target is None:
                target = logits.argmax(-1)
            target = torch.as_tensor(target, device=logits.device).expand(len(logits))
            chosen = logits.gather(1, target[:, None]).sum()
            x = captured["x"]
            (grad,) = torch.autograd.grad(chosen, x)
    finally:
        handle.remove()
    scores = (x * grad).sum(-1).detach()[:, classifier.num_prefix_tokens:]  # no score for the class token
    if valid is not None:
        scores = scores * valid.to(scores.dtype)
    return scores, target


def cell_index(means: Tensor, rows: int, cols: int) -> Tensor:
    """Row-major index ``[B, k]`` of the cell of a ``rows x cols`` grid over the image that holds
    each centre ``means [B, k, 2]`` (normalised; the image's edges belong to the edge cells)."""
    unit = (means.clamp(-1, 1 - 1e-6) + 1) / 2
    return (unit[..., 1] * rows).floor().long() * cols + (unit[..., 0] * cols).floor().long()


def cell_map(values: Tensor, means: Tensor, grid: int = 16, valid: Tensor | None = None) -> Tensor:
    """``values [B, k]`` at centres ``means [B, k, 2]`` (normalised) -> ``[B, grid, grid]`` sums per cell."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    b, k = values.shape
    index = cell_index(means, grid, grid)
    v = values if valid is None else values * valid.to(values.dtype)
    out = torch.zeros(b, grid * grid, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, index, v)
    return out.view(b, grid, grid)


def det_sigma_map(gaussians: Gaussians, height: int, width: int) -> Tensor:
    """Per-pixel log det(Sigma) ``[B, H, W]`` of the Gaussians covering each pixel, alpha-composited
    with their opacities and normalised by the accumulated opacity (uncovered pixels: NaN).
    Sigma is in pixel units here, so the values read as log of squared pixel areas."""
    # det(D Sigma D) with D = diag(W/2, H/2), the normalised-to-pixel scaling
    logdet = (det_covariance(gaussians.scales) * (width * height / 4) ** 2).clamp_min(1e-12).log()
    ones = torch.ones_like(logdet)
    both = Gaussians(gaussians.means, gaussians.scales, gaussians.angles, torch.stack([logdet, ones], -1),
                     gaussians.opacities, gaussians.valid)
    out = render(both, height=height, width=width)
    weight = out[:, 1]
    return torch.where(weight > 1e-3, out[:, 0] / weight.clamp_min(1e-3), torch.full_like(weight, float("nan")))


# --------------------------------------------------------------------------- a trained model on images


def explain_images(model, images: Tensor, *, target: int | None = None, grid: int = 16, top: int = 5,
                   seed: int = 0) -> dict:
    """Everything ``gvit explain`` draws, as tensors, for ``images [B, 3, S, S]`` (S = the model's
    image size) and a trained :class:`gvit.models.GViT` (g0 drawn from a generator seeded by ``seed``):

    ``g`` raw Gaussians ``[B, k, 9]``, ``gaussians`` (decoded), ``rendered [B, 3, S, S]``, ``psnr [B]``,
    ``logits [B, classes]``, ``top_classes`` / ``top_probs [B, top]``, ``target [B]`` (the class
    explained: ``target`` or the prediction), ``cdam [B, k]`` (per Gaussian), ``cdam_map
    [B, grid, grid]``, ``det_sigma [B, k]`` (normalised units), ``det_map [B, S, S]``
    (:func:`det_sigma_map`, pixel units, log).
    """
    num_classes = model.num_classes
    if target is not None and not 0 <= target < num_classes:
        raise ValueError(f"class {target} out of range: the model has {num_classes} classes")
    out = model.predict(images, generator=torch.Generator().manual_seed(seed))
    g = out["g"].float()
    gaussians = model.decode(g.cpu())
    probs = out["logits"].float().softmax(-1).cpu()
    top_probs, top_classes = probs.topk(min(top, num_classes), dim=-1)
    scores, chosen = cdam(model.classifier, out["g"], target)
    scores = scores.float().cpu()
    size = images.shape[-2:]
    return {"g": g.cpu(), "gaussians": gaussians, "rendered": out["rendered"].float().cpu(),
            "psnr": out["psnr"].float().cpu(), "logits": out["logits"].float().cpu(), "top_classes": top_classes,
            "top_probs": top_probs, "target": chosen.cpu(), "cdam": scores,
            "cdam_map": cell_map(scores, gaussians.means, grid), "det_sigma": det_covariance(gaussians.scales),
            "det_map": det_sigma_map(gaussians, *size)}


# --------------------------------------------------------------------------- numbers over a test set


def rank_correlation(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Spearman rank correlation of ``a`` and ``b`` ``[B, k]`` along k, per row, over the valid
    slots: ``[B]`` (NaN for a row with fewer than 3 valid slots or a constant input)."""
    out = torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(a.shape[0]):
        keep = slice(None) if valid is None else valid[i]
        x, y = a[i][keep].double(), b[i][keep].double()
        if len(x) < 3:
            continue
        rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denom = (rx.square().sum() * ry.square().sum()).sqrt()
        if x.unique().numel() > 1 and y.unique().numel() > 1 and denom > 0:
            out[i] = (rx * ry).sum() / denom
    return out


def object_share(gaussians, masks: Tensor) -> Tensor:
    """``[B]``: the share of the Gaussians' opacity whose centres lie on the object (``masks``
    ``[B, H, W]`` bool; the pixel under each centre decides), over the valid Gaussians."""
    return mask_mass(gaussians.opacities, gaussians.means, masks, gaussians.valid)["inside"]


def mask_mass(scores: Tensor, means: Tensor, masks: Tensor, valid: Tensor | None = None) -> dict:
    """How much of the positive CDAM evidence sits on the object. ``scores [B, k]``, centres
    ``means [B, k, 2]`` (normalised), object ``masks [B, H, W]`` (bool). Returns per image
    ``inside`` (positive score mass of the Gaussians centred on the object / all positive mass;
    NaN when no score is positive), ``gaussians_inside`` (fraction of the Gaussians centred on
    the object, the mass a score blind to the object would put there) and ``area`` (object
    pixels / all pixels)."""
    b, h, w = masks.shape
    on = masks.flatten(1).gather(1, cell_index(means, h, w))  # [B, k]: the pixel under each centre
    keep = torch.ones_like(on) if valid is None else valid
    pos = scores.double().clamp_min(0) * keep
    total = pos.sum(1)
    inside = torch.where(total > 0, (pos * on).sum(1) / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    return {"inside": inside, "gaussians_inside": (on & keep).sum(1).double() / keep.sum(1).clamp_min(1),
            "area": masks.flatten(1).double().mean(1)}
