"""Optimisers and the learning-rate schedule.

AdamW groups come from what each model declares (:class:`gvit.models.TransformerModel`:
``no_weight_decay()``, ``layer_id()``, ``num_layers``), so nothing here matches parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import all_ranks, all_reduce_grads

__all__ = ["param_groups", "adamw", "peak_learning_rate", "learning_rate", "set_learning_rate", "gradient_norm",
           "clip_gradients", "apply_gradients"]


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, or what the model's
    ``no_weight_decay()`` names); with ``layer_decay`` < 1 each group's ``lr_scale`` is
    layer_decay ** (num_layers - 1 - layer_id). A model without these declarations (a ``transformers``
    model) decays every matrix and is one layer."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay != 1.0 and not hasattr(model, "layer_id"):
        raise ValueError(f"layer-wise lr decay needs a model that declares layer_id(); {type(model).__name__} does not")
    top = getattr(model, "num_layers", 1) - 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or name in skip
        layer = model.layer_id(name) if layer_decay != 1.0 else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (top - layer) if layer_decay != 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def adamw(cfg, model: nn.Module, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, as one fused kernel per parameter where torch has one for the
    parameters' device (CPU and CUDA), else the multi-tensor path: the same update, without the
    per-parameter Python loop (half to a quarter of the optimiser's time on a small model)."""
    groups = param_groups(model, cfg.weight_decay, layer_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except RuntimeError:  # torch has no fused kernel for these parameters (their device, dtype or version)
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def peak_learning_rate(cfg) -> float:
    """The schedule's peak: ``base_lr`` scaled linearly with the batch (``base_lr * batch / 256``)."""
    return cfg.base_lr * cfg.batch_size / 256


def learning_rate(cfg, step: int, start: int = 0, span: tuple[int, int] | None = None) -> float:
    """base_lr * batch / 256, linear warm-up over ``warmup`` of training, then cosine down to
    ``lr_floor`` times that peak (0: to 0). A model that starts training at step ``start`` > 0 (with
    fresh optimiser moments) gets the same warm-up from there, on top of the cosine. With ``span``
    ``(first, end)`` the warm-up and cosine run over those steps alone (a phase with a schedule of
    its own: GViT's ``phase_lr``), restarting from the peak at ``first``."""
    peak = peak_learning_rate(cfg)
    first, end = span or (0, cfg.steps)
    warm = int(cfg.warmup * (end - first))
    t = max(0, step - first - warm) / max(1, end - first - warm)
    ramp = min(1.0, max(0, step - max(start, first) + 1) / warm) if warm else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    return peak * ramp * (cosine if not cfg.lr_floor else cfg.lr_floor + (1 - cfg.lr_floor) * cosine)


def set_learning_rate(optimizers, lr: float) -> None:
    """Every group's lr = ``lr`` times its ``lr_scale``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def gradient_norm(params) -> torch.Tensor:
    """The L2 norm of all the gradients of ``params`` together (nan or inf when any entry is), in
    one multi-tensor pass."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_gradients(params, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their total norm (``norm``, already taken) is at most ``max_norm``,
    as ``torch.nn.utils.clip_grad_norm_`` does."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def apply_gradients(trained: list[tuple[nn.Module, torch.optim.Optimizer]], loss, *, grad_clip: float | None) -> bool:
    """Backward ``loss`` (unless the gradients are already set, ``loss`` None), average them over
    the ranks, skip the step on every rank when anything is NaN/inf (the total gradient norm is,
    one pass per model), clip, step. Returns whether the step was taken."""
    if loss is not None:
        for _, opt in trained:
            opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        if not all_ranks(finite):  # every rank skips together, or none does
            for _, opt in trained:
                opt.zero_grad(set_to_none=True)
            return False
    norms = []
    for model, opt in trained:
        params = [p for p in model.parameters() if p.requires_grad]
        all_reduce_grads(params)
        norm = gradient_norm(params)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            return False
        norms.append((params, norm))
    for (_, opt), (params, norm) in zip(trained, norms):
        if grad_clip:
            clip_gradients(params, grad_clip, norm)
        opt.step()
    return True
