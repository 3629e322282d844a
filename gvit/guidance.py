"""GViT's training mechanics: the losses of one batch, constructive gradient guidance, and the
phase schedule (paper 2.2, equation (1), Algorithm 1, Appendix A).

One batch: g0 (random raw Gaussians) -> encoder -> raw g ``[B, k, 9]`` -> (a) decode + render ->
reconstruction loss against the images, (b) classifier(g) -> cross-entropy against the labels.

Constructive guidance (every ``guidance_every`` steps of the guidance phase): the classifier is
frozen (no gradient, no optimiser step); the gradients of the reconstruction loss and of the
classification loss with respect to the encoder's parameters are taken separately and combined as
``grad_rec + gamma * grad_cls`` (or, with ``gamma_relative``, the class term sized to gamma times the
reconstruction term's norm), then the encoder takes one optimiser step. Stepping along
``-(grad_rec + gamma * grad_cls)`` *descends* the classification loss: the minus sign of the paper's
equation (1) describes the update direction (the opposite of an adversarial FGSM step), Algorithm 1
the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import reconstruction_loss
from .settings import setting

__all__ = ["PerceptualSchedule", "Phases", "Phase", "BatchLosses", "batch_losses", "guidance_backward", "stage_start",
           "check_stage"]


@dataclass(frozen=True)
class Phase:
    """What one training step does."""

    name: str
    train_encoder: bool
    train_classifier: bool
    lambda_perc: float
    lambda_cls: float
    guidance: bool


@dataclass
class PerceptualSchedule:
    """When D-SSIM joins a reconstruction loss, and its weight (GViT's encoder and the tokenizer)."""

    perceptual_from: float = setting(0.1, "D-SSIM joins the reconstruction loss from this step (a whole number "
                                          "above 1) or fraction of training (up to 1)")
    lambda_perc: float = setting(0.1, "weight of D-SSIM in the reconstruction loss")

    def __post_init__(self) -> None:
        check_stage("perceptual_from", self.perceptual_from)
        if self.lambda_perc < 0:
            raise ValueError(f"phases: lambda_perc must be >= 0, got {self.lambda_perc}")

    def perceptual_weight(self, step: int, total: int) -> float:
        """The D-SSIM weight of 0-based ``step`` out of ``total`` steps."""
        return self.lambda_perc if step >= stage_start(self.perceptual_from, total) else 0.0


@dataclass
class Phases(PerceptualSchedule):
    """GViT's phase schedule (Appendix A): each boundary a step (a whole number above 1) or a fraction of
    training (up to 1; :func:`stage_start`).

    [0, classifier_from): the encoder alone on the reconstruction loss, with D-SSIM weighted by
    ``lambda_perc`` from ``perceptual_from`` on; [classifier_from, pretrain_until): the classifier alone on
    frozen Gaussians (the pre-training variant of 2.2; none by default); then encoder and classifier
    jointly with ``lambda_cls``; from ``guidance_from`` on, every ``guidance_every``-th step is a guidance
    step with ``gamma``. The fields are settings (:mod:`gvit.settings`); GViT's run settings extend them.
    """

    classifier_from: float = setting(0.25, "the classifier trains from this step (above 1) or fraction of training")
    pretrain_until: float | None = setting(None, "classifier alone on frozen Gaussians until this step or fraction "
                                                 "(none: no pre-training)")
    guidance_from: float = setting(0.75, "constructive guidance steps from this step (above 1) or fraction of "
                                         "training")
    lambda_cls: float = setting(1.0, "weight of the cross-entropy in joint steps")
    gamma: float = setting(0.1, "guidance strength: encoder gradient = grad_rec + gamma * grad_cls")
    gamma_relative: bool = setting(False, "gamma sizes the class term against the reconstruction gradient: encoder "
                                          "gradient = grad_rec + gamma * |grad_rec| / |grad_cls| * grad_cls (L2 norms "
                                          "over the encoder's parameters, per guidance step); false: the paper's "
                                          "grad_rec + gamma * grad_cls")
    guidance_every: int = setting(10, "every n-th step of the guidance phase is a guidance step")
    phase_lr: bool = setting(False, "each stage (the encoder alone, classifier pre-training, joint training with its "
                                    "guidance phase) has a learning-rate schedule of its own: warm-up over warmup of "
                                    "the stage, then cosine from the peak down to lr_floor (false: one schedule over "
                                    "the whole run)")
    joint_lr: float = setting(1.0, "phase_lr: the joint stage's peak learning rate, as a fraction of the peak (the "
                                   "encoder and classifier are trained already; a full restart can undo them)")

    def __post_init__(self) -> None:
        PerceptualSchedule.__post_init__(self)
        for name in ("classifier_from", "pretrain_until", "guidance_from"):
            if getattr(self, name) is not None:
                check_stage(name, getattr(self, name))
        stages = (self.classifier_from, self.pretrain_end, self.guidance_from)
        if all(v <= 1 for v in stages) or all(v > 1 for v in stages):  # one unit: the order shows without a total
            self.check_order(None)
        if not 0 < self.joint_lr <= 1:
            raise ValueError(f"phases: joint_lr must be in (0, 1], got {self.joint_lr}")
        if self.guidance_every < 1 or self.gamma < 0 or self.lambda_cls < 0:
            raise ValueError(f"phases: guidance_every must be >= 1 and gamma, lambda_cls >= 0, got {self}")

    def check_order(self, total: int | None) -> None:
        """Refuse stages out of order (in steps of a ``total``-step run; None: as the values are written)."""
        stages = [self.classifier_from, self.pretrain_end, self.guidance_from]
        starts = stages if total is None else [stage_start(v, total) for v in stages]
        if starts != sorted(starts):
            raise ValueError("phases: need classifier_from <= pretrain_until <= guidance_from, got "
                             f"{self.classifier_from}, {self.pretrain_end}, {self.guidance_from}"
                             + ("" if total is None else f" (steps {starts} of {total})"))

    @property
    def pretrain_end(self) -> float:
        return self.classifier_from if self.pretrain_until is None else self.pretrain_until

    def classifier_start(self, total: int) -> int:
        """The first step (0-based, of ``total``) at which the classifier trains."""
        return stage_start(self.classifier_from, total)

    def guidance_start(self, total: int) -> int | None:
        """The first step of the guidance phase, or None when the run has none."""
        start = stage_start(self.guidance_from, total)
        return start if start < total else None

    def boundaries(self, total: int) -> list[int]:
        """``[0, ..., total]`` with the first step of each stage that has steps between: the encoder
        alone, classifier pre-training, joint training (its guidance phase included: guidance
        continues the joint training, as in the paper's last epochs)."""
        starts = {stage_start(f, total) for f in (self.classifier_from, self.pretrain_end)}
        return [0, *sorted(s for s in starts if 0 < s < total), total]

    def span(self, step: int, total: int) -> tuple[int, int]:
        """``(first, end)``: the steps of the stage (:meth:`boundaries`) 0-based ``step`` belongs to."""
        if not 0 <= step < total:
            raise ValueError(f"phases: step {step} outside a run of {total} steps")
        edges = self.boundaries(total)
        i = max(j for j in range(len(edges) - 1) if edges[j] <= step)
        return edges[i], edges[i + 1]

    def at(self, step: int, total: int) -> Phase:
        """The phase of 0-based ``step`` out of ``total`` steps."""
        if total < 1 or not 0 <= step < total:
            raise ValueError(f"phases: step {step} outside a run of {total} steps")
        perc = self.perceptual_weight(step, total)
        if step < stage_start(self.classifier_from, total):
            return Phase("encoder", True, False, perc, 0.0, False)
        if step < stage_start(self.pretrain_end, total):
            return Phase("classifier-pretrain", False, True, perc, self.lambda_cls, False)
        first = stage_start(self.guidance_from, total)
        if step >= first:
            if (step - first) % self.guidance_every == self.guidance_every - 1:
                return Phase("guidance", True, False, perc, self.lambda_cls, True)
        return Phase("joint", True, True, perc, self.lambda_cls, False)


def check_stage(name: str, value: float) -> None:
    """Refuse a stage boundary that is neither a fraction in [0, 1] nor a step (a whole number above 1)."""
    if not (0 <= value <= 1 or (value > 1 and float(value).is_integer())):
        raise ValueError(f"phases: {name} must be a fraction of training in [0, 1] or a step (a whole number above "
                         f"1), got {value}")


def stage_start(value: float, total: int) -> int:
    """The first step (0-based) of a stage that starts at ``value`` in a run of ``total`` steps: the step
    ``value`` itself when it is above 1 (at most ``total``), else the smallest s with s / total >= ``value``."""
    if value > 1:
        return min(int(value), total)
    fraction = value
    s = math.ceil(fraction * total)
    while s > 0 and (s - 1) / total >= fraction:
        s -= 1
    while s / total < fraction:
        s += 1
    return s


@dataclass
class BatchLosses:
    """Losses of one batch: ``reconstruction`` (pixel + lambda_perc * D-SSIM), ``classification``
    (cross-entropy, None when no classifier ran), the raw Gaussians ``g``, the render and logits."""

    reconstruction: Tensor
    classification: Tensor | None
    g: Tensor
    rendered: Tensor
    logits: Tensor | None
    stats: dict | None = None


def batch_losses(model: nn.Module, images: Tensor, labels: Tensor | None, g0: Tensor | None, *,
                 classify: bool = True, pixel_loss: str = "bce", lambda_perc: float = 0.0,
                 augment=None) -> BatchLosses:
    """Run a :class:`gvit.models.GViT` on one batch: encoder, render, reconstruction loss and (when
    ``classify``) the classifier; without ``labels`` the classification loss is None (the logits
    are still computed). ``augment``, when given, maps the Gaussians the classifier reads (raw
    ``[B, k, 9]``) to ``(raw, valid)`` (:func:`gvit.data.transforms.augment_gaussians`); the
    reconstruction loss reads them unchanged."""
    return _losses_of(model, model.encode(images, g0), images, labels, classify, pixel_loss, lambda_perc, augment)


def _losses_of(model: nn.Module, g: Tensor, images: Tensor, labels: Tensor | None, classify: bool, pixel_loss: str,
               lambda_perc: float, augment=None) -> BatchLosses:
    """The reconstruction loss of the encoder's Gaussians ``g``; the classifier reads them after
    the model's test-time fitting (:meth:`gvit.models.GViT.refine`, straight-through)."""
    rendered = model.reconstruct(g, *images.shape[-2:])  # rasterized in float32 (also under bf16 autocast)
    rec = reconstruction_loss(rendered, images.float(), pixel_loss, dssim_weight=lambda_perc)
    logits = cls = None
    if classify:
        read = model.refine(images, g)
        logits = model.classifier(*augment(read)) if augment is not None else model.classifier(read)
        cls = F.cross_entropy(logits, labels) if labels is not None else None
    return BatchLosses(rec, cls, g, rendered, logits)


def guidance_backward(model: nn.Module, images: Tensor, labels: Tensor, g0: Tensor | None, *, gamma: float,
                      relative: bool = False, pixel_loss: str = "bce", lambda_perc: float = 0.0,
                      measure: bool = False) -> BatchLosses:
    """Add grad_rec + gamma * grad_cls to the encoder's ``.grad`` of a :class:`gvit.models.GViT`
    (zero it first) with the classifier frozen (its parameters get no gradient). Non-finite values
    are left for the caller's guard to see.

    With ``relative`` the class term is sized against the reconstruction term: grad_rec + gamma *
    |grad_rec| / |grad_cls| * grad_cls, the norms taken over the encoder's parameters (so the class
    term's norm is gamma times the reconstruction term's; a zero grad_cls adds nothing). Under AdamW,
    which normalises the sum, the raw ``gamma * grad_cls`` sets the step's direction whenever
    grad_cls dwarfs grad_rec, whatever gamma is; ``relative`` keeps gamma a share.

    With ``measure`` ``losses.stats`` holds the L2 norms over the encoder's parameters of ``grad_rec``
    and of the class term added (``gamma * grad_cls``, rescaled with ``relative``) and their cosine
    (``guide_rec_norm``, ``guide_cls_norm``, ``guide_cos``). ``relative`` and ``measure`` pull the
    two parts back separately (one more encoder backward)."""
    frozen = [p for p in model.classifier.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        g = model.encode(images, g0)
        # both gradients are taken at g and pulled back through the encoder once: J^T (d rec/dg +
        # gamma d cls/dg) = grad_rec + gamma * grad_cls exactly, at the cost of one encoder backward
        at = g.detach().requires_grad_(True)
        losses = _losses_of(model, at, images, labels, True, pixel_loss, lambda_perc)
        d_rec, = torch.autograd.grad(losses.reconstruction, at, retain_graph=True)
        d_cls, = torch.autograd.grad(losses.classification, at)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    losses.g = g
    if not (measure or relative):
        g.backward(d_rec + gamma * d_cls)
        return losses
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    rec = torch.autograd.grad(g, params, d_rec, retain_graph=True, allow_unused=True)
    cls = torch.autograd.grad(g, params, d_cls, allow_unused=True)

    def dot(a, b):  # sum over the encoder's parameters, without concatenating them
        return float(sum((x.float() * y.float()).sum() for x, y in zip(a, b) if x is not None and y is not None))

    rec_norm, cls_norm = dot(rec, rec) ** 0.5, dot(cls, cls) ** 0.5
    scale = gamma
    if relative:
        scale = gamma * rec_norm / cls_norm if cls_norm > 0 else 0.0
    for p, r, c in zip(params, rec, cls):  # accumulate as backward would; untouched parameters keep no grad
        parts = [x for x in (r, None if c is None else scale * c) if x is not None]
        if parts:
            p.grad = sum(parts) if p.grad is None else p.grad + sum(parts)
    if measure:
        losses.stats = {"guide_rec_norm": rec_norm, "guide_cls_norm": cls_norm * scale,
                        "guide_cos": dot(rec, cls) / max(rec_norm * cls_norm, 1e-8)}
    return losses
