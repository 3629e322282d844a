"""Fitting Gaussians to images by optimisation, many images at once (initialisations: :mod:`gvit.fit.init`).

Every image of a batch gets its own k Gaussians; all of them are optimised together with one
batched render per step. The recipe follows GaussianVision (structured initialisation,
luminance-aware pruning with an L1 penalty on opacities) and GViT 2.2 (k-means and Felzenszwalb
initialisations):

* parameters are the raw 9-vectors of :mod:`gvit.gaussians`, decoded with ``scale_factor``;
* Adam with one learning rate per raw field (positions in pixels per step, the rest in raw units),
  a short linear warm-up and a cosine decay to ``final_lr_fraction``;
* loss = MSE or BCE + ``dssim_weight`` * D-SSIM + ``l1_opacity`` * mean opacity;
* optional early stop per image at ``target_psnr`` (a finished image leaves the batch);
* optional pruning at ``prune_at`` (a fraction of the iterations): Gaussians whose luminance
  contribution (:func:`gvit.fit.budget.luminance_contribution`) is below ``prune_tau`` times the image's mean
  contribution are switched off (``valid`` = False); the rest keep fitting.
* optional adaptive budget (``grow_from`` < 1): the fit starts with that share of the k Gaussians
  and, in ``grow_rounds`` rounds up to ``grow_until``, moves the ones that contribute little
  (``grow_prune``) and adds the rest at the pixels where the render is most wrong, in front
  (Image-GS's error-driven placement), so the budget goes where the image needs it;
* optional projection (:data:`Projection`, e.g. :mod:`gvit.codec`'s quantiser) from ``project_from`` x the
  iterations on: the end of the fit optimises exactly the values and the order that will be stored;
* two recipes fill the settings a config leaves unset (:data:`RECIPES`): ``small`` (CIFAR-sized
  images) and ``photo``; ``recipe="auto"`` picks by the image's pixel count.

Images are ``[B, 3, H, W]`` float in [0, 1]; the background of every render is black (zeros),
as in the rest of gvit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..gaussians import ANGLE, COLOR, OPACITY, POS, RAW_DIM, SCALE, Gaussians, decode, take, take_sets
from ..losses import RECONSTRUCTION_LOSSES, psnr, reconstruction_loss, ssim
from ..render import BACKENDS, MODES, render
from ..progress import progress_bar
from ..settings import setting, validate_fields
from .budget import GROW_WIDTH, grow_round, grow_schedule, prune_weak
from .recipes import PHOTO_PIXELS, PHOTO_SPACING, RECIPES, recipe_values
from .init import INITS, check_images, initialize
from .memory import check_memory

__all__ = ["FitConfig", "FitResult", "Projection", "fit_gaussians", "fit_raw"]

@dataclass
class FitConfig:
    """Settings of :func:`fit_gaussians`, declared once (:mod:`gvit.settings`): the ``gvit fit``
    options, config files and keyword overrides all read these declarations."""

    num_gaussians: int = setting(256, "Gaussians per image (k)")
    recipe: str = setting("auto", "the defaults of the settings left unset (None): small (CIFAR-sized images), "
                                  "photo (fewer steps, larger step sizes, an adaptive budget; tuned on photos), "
                                  f"auto: photo from {PHOTO_PIXELS:,} pixels (256x256) up", ("auto", *RECIPES))
    iters: int | None = setting(None, "optimisation steps (recipe: small 500, photo 160, more at under "
                                      f"{PHOTO_SPACING:g} pixels between Gaussians)")
    init: str = setting("grid", "initialisation", INITS)
    loss: str = setting("mse", "pixel loss", RECONSTRUCTION_LOSSES)
    dssim_weight: float = setting(0.0, "weight of the D-SSIM term")
    lr_position: float | None = setting(None, "position step size in pixels (Adam's step on the raw position, "
                                              "converted; recipe: small 0.1, photo 1.0, less at "
                                              f"under {PHOTO_SPACING:g} pixels between Gaussians)")
    lr_scale: float | None = setting(None, "step size of the raw scales (recipe: small 0.05, photo 0.1)")
    lr_angle: float | None = setting(None, "step size of the angle (recipe: small 0.05, photo 0.1)")
    lr_color: float | None = setting(None, "step size of the raw colours (recipe: small 0.05, photo 0.1)")
    lr_opacity: float | None = setting(None, "step size of the raw opacity (recipe: small 0.05, photo 0.1)")
    warmup: float | None = setting(None, "linear warm-up, as a fraction of the iterations (recipe: small 0.02, "
                                         "photo 0)")
    final_lr_fraction: float | None = setting(None, "the cosine decay ends at this fraction of each step size "
                                                    "(recipe: small 0.01, photo 0.05)")
    target_psnr: float | None = setting(None, "stop an image once its PSNR reaches this (dB)")
    check_every: int = setting(10, "iterations between PSNR checks (target PSNR, history)")
    l1_opacity: float = setting(0.0, "L1 penalty on opacities (drives unneeded Gaussians to 0 before pruning)")
    prune_tau: float | None = setting(
        None, "prune Gaussians whose luminance contribution is below tau x the image mean"
    )
    prune_at: float = setting(0.6, "when to prune, as a fraction of the iterations")
    scale_factor: float = setting(1.0, "c in scale = c * sigmoid(s)")
    mode: str = setting("alpha", "rasterizer compositing", MODES)
    backend: str = setting("auto", "rasterizer backend", BACKENDS)
    seed: int = setting(0, "seed of the random choices of the initialisation")
    coarse_until: float = setting(0.0, "coarse-to-fine: until this fraction of the iterations, render and compare "
                                       "at half the resolution (a quarter of the pixel work)")
    grow_from: float | None = setting(None, "adaptive budget: start with this share of num_gaussians and add the "
                                            "rest where the error is largest, in rounds (1: a fixed budget; "
                                            "recipe: small 1, photo 0.2)")
    grow_rounds: int = setting(2, "adaptive budget: rounds of additions")
    grow_until: float = setting(0.2, "adaptive budget: the last round, as a fraction of the iterations")
    grow_width: float = setting(GROW_WIDTH, "adaptive budget: sigma of an added Gaussian, in mean spacings "
                                            "sqrt(H W / count)")
    grow_prune: float = setting(0.05, "adaptive budget: each round first moves the Gaussians whose luminance "
                                      "contribution is below this x the image mean to where the error is (0: none)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        validate_fields(self, where="fit config")

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"fit config: {name} must be {what}, got {getattr(self, name)!r}")

        # types, finiteness and the declared choices (init, loss, mode, backend) are checked by validate_fields
        need(self.num_gaussians >= 1, "num_gaussians", "an int >= 1")
        need(self.iters is None or self.iters >= 0, "iters", "an int >= 0")
        for name in ("dssim_weight", "l1_opacity"):
            need(getattr(self, name) >= 0, name, "a finite number >= 0")
        # Adam moves a value by about its step size per iteration: beyond these the fit cannot converge
        # (a raw logit moved by 10 per step saturates; the position step is in pixels)
        for name, most in (("lr_position", 100.0), ("lr_scale", 10.0), ("lr_angle", 10.0), ("lr_color", 10.0),
                           ("lr_opacity", 10.0)):
            need(getattr(self, name) is None or 0 <= getattr(self, name) <= most, name, f"in [0, {most:g}]")
        need(self.warmup is None or 0 <= self.warmup < 1, "warmup", "in [0, 1)")
        need(self.final_lr_fraction is None or 0 < self.final_lr_fraction <= 1, "final_lr_fraction", "in (0, 1]")
        need(0 <= self.prune_at <= 1, "prune_at", "in [0, 1]")
        need(0 <= self.coarse_until <= 1, "coarse_until", "in [0, 1]")
        need(self.grow_from is None or 0 < self.grow_from <= 1, "grow_from", "in (0, 1]")
        need(self.grow_rounds >= 1, "grow_rounds", ">= 1")
        need(0 <= self.grow_until <= 1, "grow_until", "in [0, 1]")
        need(self.grow_prune >= 0, "grow_prune", ">= 0")
        need(self.grow_width > 0, "grow_width", "> 0")
        need(self.prune_tau is None or self.prune_tau >= 0, "prune_tau", "None or >= 0")
        need(self.target_psnr is None or self.target_psnr > 0, "target_psnr", "None or > 0")
        need(self.check_every >= 1, "check_every", ">= 1")
        need(self.scale_factor > 0, "scale_factor", "> 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_for(self, height: int, width: int) -> str:
        """The recipe a ``height x width`` image gets: ``recipe``, or with ``auto`` photo from
        :data:`PHOTO_PIXELS` pixels up and small below."""
        if self.recipe != "auto":
            return self.recipe
        return "photo" if height * width >= PHOTO_PIXELS else "small"

    def for_image(self, height: int, width: int) -> "FitConfig":
        """This config with every unset (None) recipe setting taken from :meth:`recipe_for` the image size
        (:func:`recipe_values`: the photo recipe also adapts to the Gaussians per pixel)."""
        name = self.recipe_for(height, width)
        values = recipe_values(name, height, width, self.num_gaussians)
        return replace(self, recipe=name, **{key: value for key, value in values.items() if getattr(self, key) is None})


@dataclass
class FitResult:
    """What :func:`fit_gaussians` returns.

    ``raw`` ``[B, k, 9]`` and ``gaussians`` (decoded with the config's scale factor; ``valid``
    marks the Gaussians in use: those that survived pruning, or an adaptive budget's that a target PSNR
    stopped short of k; None when every slot is used), per-image ``psnr`` and
    ``ssim`` ``[B]`` of the final render ``rendered`` ``[B, 3, H, W]`` (clamped to [0, 1]),
    ``iters`` ``[B]`` steps taken (fewer than the config's when ``target_psnr`` stopped an image
    early), ``psnr_before_prune`` ``[B]`` (NaN without pruning), wall-clock ``seconds``,
    ``history``: (step, seconds, mean PSNR of the images still fitting) every ``check_every`` steps,
    and ``config``, the settings the fit ran with (the recipe resolved for the image size).
    """

    raw: Tensor
    gaussians: Gaussians
    psnr: Tensor
    ssim: Tensor
    iters: Tensor
    psnr_before_prune: Tensor
    seconds: float
    rendered: Tensor
    history: list[tuple[int, float, float]] = field(default_factory=list)
    config: FitConfig | None = None

    def to(self, device) -> "FitResult":
        """The same result with every tensor on ``device``."""
        tensors = {name: getattr(self, name).to(device) for name in
                   ("raw", "gaussians", "psnr", "ssim", "iters", "psnr_before_prune", "rendered")}
        return replace(self, **tensors)


# --------------------------------------------------------------------------- the fitting loop


def _lr_vector(cfg: FitConfig, height: int, width: int, dtype, device) -> Tensor:
    lr = torch.empty(RAW_DIM, dtype=dtype, device=device)
    lr[POS] = cfg.lr_position * 2.0 / max(height, width)  # pixels -> normalised units (d tanh ~ 1)
    lr[SCALE] = cfg.lr_scale
    lr[ANGLE] = cfg.lr_angle
    lr[COLOR] = cfg.lr_color
    lr[OPACITY] = cfg.lr_opacity
    return lr


def _schedule(cfg: FitConfig, step: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up, then cosine to final_lr_fraction."""
    warm = int(cfg.warmup * cfg.iters)
    if step < warm:
        return (step + 1) / (warm + 1)
    t = (step - warm) / max(1, cfg.iters - warm)
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def _per_image_psnr(out: Tensor, target: Tensor) -> Tensor:
    return psnr(out.detach().clamp(0, 1), target)


Projection = Callable[[Gaussians], "tuple[Gaussians, Tensor]"]
"""``project(g) -> (projected, order)``: Gaussians ``[B, k]`` to the values kept (straight-through gradients;
``valid`` False for slots it drops) and the order ``[B, k]`` to keep them in (dropped slots last). Every
projected step renders the projected values, with parameters and optimiser state put in that order."""


def fit_gaussians(images: Tensor, config: FitConfig | None = None, *, init_raw: Tensor | None = None,
                  progress: bool = False, project: Projection | None = None, project_from: float = 0.75,
                  **overrides) -> FitResult:
    """Fit ``config.num_gaussians`` Gaussians to each image of ``images`` ``[B, 3, H, W]``.

    ``config`` fields can be overridden by keyword (``fit_gaussians(x, iters=200)``).
    ``init_raw`` ``[B, k, 9]`` replaces the configured initialisation. With ``project``, the result holds the
    projected Gaussians in the projection's order (``raw`` in the same order). Runs on the images' device
    in float32 (also inside ``torch.no_grad()`` or autocast); shows a tqdm bar when ``progress`` is true.
    """
    cfg = _resolved(images, config, overrides)
    if not 0 <= project_from <= 1:
        raise ValueError(f"project_from must be in [0, 1], got {project_from!r}")
    with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        fit = _optimise(images.float(), cfg, init_raw, progress, project, project_from)
    target = images.detach().float()
    raw = fit.raw
    with torch.no_grad():
        g = decode(raw, cfg.scale_factor)
        g.valid = None if bool(fit.valid.all()) and cfg.prune_tau is None and project is None else fit.valid
        if project is not None:
            g, order = project(g)
            g, raw = take_sets(g, order), take(raw, order)
        out = render(g, height=target.shape[-2], width=target.shape[-1], mode=cfg.mode, backend=cfg.backend).clamp(0, 1)
        final_psnr, final_ssim = psnr(out, target), ssim(out, target)
    return FitResult(raw=raw, gaussians=g, psnr=final_psnr.detach().cpu(), ssim=final_ssim.detach().cpu(),
                     iters=fit.iters, psnr_before_prune=fit.psnr_before_prune,
                     seconds=time.perf_counter() - fit.start, rendered=out, history=fit.history, config=cfg)


def fit_raw(images: Tensor, config: FitConfig | None = None, *, init_raw: Tensor | None = None,
            **overrides) -> Tensor:
    """The raw Gaussians ``[B, k, 9]`` :func:`fit_gaussians` fits, without its final render and
    measures (what a model's test-time fitting steps need: the same values, one render and SSIM
    fewer). Settings that prune or grow, whose result needs its ``valid`` mask, are refused."""
    cfg = _resolved(images, config, overrides)
    if cfg.prune_tau is not None or grow_schedule(cfg.iters, cfg.grow_from, cfg.grow_rounds, cfg.grow_until):
        raise ValueError("fit_raw: this config prunes or grows Gaussians; use fit_gaussians (its result carries "
                         "the valid mask)")
    with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        return _optimise(images.float(), cfg, init_raw, False, None, 1.0).raw


def _resolved(images: Tensor, config: FitConfig | None, overrides: dict) -> FitConfig:
    """``config`` (default settings when None) with ``overrides``, checked, for these images' size."""
    cfg = replace(config or FitConfig(), **overrides) if overrides else (config or FitConfig())
    cfg.validate()
    check_images(images)
    return cfg.for_image(*images.shape[-2:])


class _Optimised(NamedTuple):
    """What the fitting loop leaves: the raw values, the valid mask, steps per image, PSNR before
    pruning, the PSNR history and the loop's start time (``time.perf_counter``)."""
    raw: Tensor
    valid: Tensor
    iters: Tensor
    psnr_before_prune: Tensor
    history: list
    start: float


def _optimise(images: Tensor, cfg: FitConfig, init_raw: Tensor | None, progress: bool,
              project: Projection | None, project_from: float) -> _Optimised:
    """The fitting loop (the module docstring)."""
    b, _, h, w = images.shape
    k = cfg.num_gaussians
    check_memory(b, k, h, w, images.device)
    target = images.detach()
    start = time.perf_counter()
    grow_at = grow_schedule(cfg.iters, cfg.grow_from, cfg.grow_rounds, cfg.grow_until)
    valid = torch.ones(b, k, dtype=torch.bool, device=target.device)
    if init_raw is None:
        first = max(1, int(round(cfg.grow_from * k))) if grow_at else k  # the adaptive budget starts smaller
        raw = initialize(target, first, cfg.init, scale_factor=cfg.scale_factor, seed=cfg.seed)
        raw = torch.cat([raw, raw.new_zeros(b, k - first, RAW_DIM)], 1)
        valid[:, first:] = False
    else:
        raw = init_raw.detach().to(target)
    if raw.shape != (b, k, RAW_DIM):
        raise ValueError(f"init_raw: expected shape {(b, k, RAW_DIM)}, got {tuple(raw.shape)}")
    raw = raw.clone()
    exp_avg, exp_sq = torch.zeros_like(raw), torch.zeros_like(raw)
    age = None  # Adam steps per Gaussian, once the adaptive budget has added some (their moments start at 0)
    lr = _lr_vector(cfg, h, w, raw.dtype, raw.device)
    beta1, beta2, eps = 0.9, 0.999, 1e-15
    active = torch.arange(b, device=raw.device)  # images still being fitted
    steps_taken = torch.full((b,), cfg.iters, dtype=torch.long)
    before_prune = torch.full((b,), float("nan"), dtype=torch.float64)
    prune_step = int(round(cfg.prune_at * cfg.iters)) if cfg.prune_tau is not None else -1
    history: list[tuple[int, float, float]] = []
    render_kw = dict(height=h, width=w, mode=cfg.mode, backend=cfg.backend)
    coarse_steps = int(round(cfg.coarse_until * cfg.iters)) if min(h, w) >= 2 else 0
    coarse_size = (-(-h // 2), -(-w // 2))
    coarse_target = torch.nn.functional.interpolate(target, size=coarse_size, mode="area") if coarse_steps else None
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    project_step = int(round(project_from * cfg.iters)) if project is not None else cfg.iters + 1

    bar = progress_bar(cfg.iters, desc=f"fit {b} x {k} Gaussians ({h}x{w})", unit="step", enabled=progress, leave=False)
    for step in range(cfg.iters):
        if len(active) == 0:
            break
        if step == prune_step:
            with torch.no_grad():
                g = decode(raw[active], cfg.scale_factor)
                g.valid = valid[active]
                before_prune[active.cpu()] = _per_image_psnr(render(g, **render_kw), target[active]).double().cpu()
                valid[active] = prune_weak(g, valid[active], cfg.prune_tau, render_kw)
        if step in grow_at:
            if age is None:
                age = torch.full((b, k, 1), step, dtype=raw.dtype, device=raw.device)
            with torch.no_grad():
                grow_round(raw, valid, (exp_avg, exp_sq, age), active, target, grow_at[step],
                           scale_factor=cfg.scale_factor, prune_tau=cfg.grow_prune, render_kw=render_kw,
                           generator=generator, width=cfg.grow_width)
        projecting = step >= project_step
        if projecting:
            with torch.no_grad():
                order = project(replace(decode(raw[active], cfg.scale_factor), valid=valid[active]))[1]
                for state in (raw, valid, exp_avg, exp_sq, *(() if age is None else (age,))):
                    state[active] = take(state[active], order)
        x = raw[active].requires_grad_(True)
        g = decode(x, cfg.scale_factor)
        g.valid = valid[active]
        if projecting:
            g = project(g)[0]
        coarse = step < coarse_steps  # normalised coordinates: the same Gaussians at half the resolution
        out = render(g, **(render_kw | dict(zip(("height", "width"), coarse_size)) if coarse else render_kw))
        tgt = (coarse_target if coarse else target)[active]
        loss = reconstruction_loss(out, tgt, cfg.loss, dssim_weight=cfg.dssim_weight)
        if cfg.l1_opacity > 0:
            loss = loss + cfg.l1_opacity * g.masked_opacities().mean()
        # every image's loss is a mean over its own pixels: scale so each image sees its own gradient
        (grad,) = torch.autograd.grad(loss * len(active), x)
        with torch.no_grad():
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            m = exp_avg[active].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = exp_sq[active].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg[active], exp_sq[active] = m, v
            if age is not None:
                age[active] += 1
            t = step + 1 if age is None else age[active]  # each Gaussian's own count once the budget added some
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            step_size = lr * (_schedule(cfg, step) / bias1)
            denom = (v / bias2).sqrt_().add_(eps)
            raw[active] = x.detach() - step_size * m / denom
            if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.iters:
                current = _per_image_psnr(out, tgt)  # PSNR of this step's render (before the update)
                history.append((step + 1, time.perf_counter() - start, float(current.mean())))
                if cfg.target_psnr is not None and not coarse:  # a half-resolution PSNR does not count
                    done = current >= cfg.target_psnr
                    if done.any():
                        steps_taken[active[done].cpu()] = step + 1
                        # keep the parameters that reached the target
                        raw[active[done]] = x.detach()[done]
                        active = active[~done]
        bar.update(1)
        if history and history[-1][0] == step + 1:
            bar.set_postfix(psnr=f"{history[-1][2]:.2f}", active=len(active))
    bar.close()
    return _Optimised(raw.detach(), valid, steps_taken, before_prune, history, start)
