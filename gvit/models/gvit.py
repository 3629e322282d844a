"""GViT: one owner for a Gaussian encoder, a Gaussian classifier and the encoder's random input g0.

Everything that runs a GViT on images (training, evaluation, reports, explanations, the leakage
tests) goes through :class:`GViT`: images ``[B, 3, S, S]`` in [0, 1] -> g0 (random raw Gaussians,
:func:`gvit.gaussians.sample_initial`) -> encoder -> raw Gaussians ``g [B, k, 9]`` -> (optionally
``fit_steps`` test-time fitting steps, :meth:`GViT.refine`) -> classifier -> logits, and
:meth:`GViT.reconstruct` renders g for the reconstruction loss.

Test-time fitting (as Instant-GaussianImage initialises per-image fitting with a network): the
encoder's Gaussians start ``fit_steps`` Adam steps on the MSE against the image with the fast
rasterizer (:func:`gvit.fit.fit_raw`); the classifier reads the result. The steps are not
differentiated: the classifier's gradient reaches the encoder straight through (``g + (fitted -
g).detach()``), so guidance still acts on the Gaussians the classifier sees, and the reconstruction
loss trains the encoder's own output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..fit import RECIPES, FitConfig, fit_raw
from ..gaussians import G0_LAYOUTS, Gaussians, decode, sample_initial
from ..losses import psnr
from ..render import render
from .encoder import GaussianEncoder
from .refiner import RefinementEncoder
from .vit import GaussianClassifier

__all__ = ["GViT"]


class GViT(nn.Module):
    """``encoder`` (:class:`GaussianEncoder` or :class:`RefinementEncoder`) + ``classifier``
    (:class:`GaussianClassifier`) with the same k; ``g0_layout`` is how g0's means are drawn (see
    :func:`gvit.gaussians.sample_initial`).
    g0 is drawn on the CPU from the given generator (so a seed gives the same g0 on any device).
    ``fit_steps`` test-time fitting steps (0: none) refine the encoder's Gaussians at step sizes
    ``fit_lr`` times :class:`gvit.fit.FitConfig`'s defaults, decaying to half of them."""

    def __init__(self, encoder: GaussianEncoder | RefinementEncoder, classifier: GaussianClassifier, *,
                 g0_layout: str = "uniform", fit_steps: int = 0, fit_lr: float = 2.0):
        super().__init__()
        if encoder.num_gaussians != classifier.num_gaussians:
            raise ValueError(f"GViT: the encoder predicts k = {encoder.num_gaussians} Gaussians but the classifier "
                             f"reads k = {classifier.num_gaussians}")
        if g0_layout not in G0_LAYOUTS:
            raise ValueError(f"g0_layout must be one of {', '.join(G0_LAYOUTS)}, got {g0_layout!r}")
        if fit_steps < 0 or not fit_lr > 0:
            raise ValueError(f"GViT: need fit_steps >= 0 and fit_lr > 0, got {fit_steps} and {fit_lr}")
        self.encoder, self.classifier, self.g0_layout = encoder, classifier, g0_layout
        self.fit_steps, self.fit_lr = fit_steps, fit_lr

    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def num_gaussians(self) -> int:
        return self.encoder.num_gaussians

    @property
    def scale_factor(self) -> float:
        return self.encoder.scale_factor

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def sample_g0(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """g0 ``[n, k, 9]`` on the model's device (None for an encoder with learned queries)."""
        if self.encoder.learned_queries:
            return None
        g0 = sample_initial(n, self.num_gaussians, layout=self.g0_layout, generator=generator)
        return g0.to(self._device())

    def encode(self, images: Tensor, g0: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """The encoder's raw Gaussians ``[B, k, 9]`` of ``images`` (what the reconstruction loss
        trains); g0 is drawn from ``generator`` when not given."""
        if g0 is None:
            g0 = self.sample_g0(len(images), generator)
        return self.encoder(images, g0)

    def fit_config(self) -> FitConfig:
        """The settings of the test-time fitting steps."""
        small = RECIPES["small"]  # the step sizes of the small-image recipe, scaled
        step_sizes = {name: small[name] * self.fit_lr
                      for name in ("lr_position", "lr_scale", "lr_angle", "lr_color", "lr_opacity")}
        return FitConfig(num_gaussians=self.num_gaussians, recipe="small", iters=max(1, self.fit_steps), loss="mse",
                         scale_factor=self.scale_factor, warmup=0.0, final_lr_fraction=0.5,
                         check_every=max(1, self.fit_steps), **step_sizes)

    def refine(self, images: Tensor, g: Tensor) -> Tensor:
        """``g`` after ``fit_steps`` test-time fitting steps against ``images`` (``g`` itself when
        there are none); the gradient passes straight through to ``g``."""
        if not self.fit_steps:
            return g
        fitted = fit_raw(images.detach().float().clamp(0, 1), self.fit_config(), init_raw=g.detach().float())
        return g + (fitted.to(g.dtype) - g).detach()

    def gaussians(self, images: Tensor, g0: Tensor | None = None, *,
                  generator: torch.Generator | None = None) -> Tensor:
        """The raw Gaussians ``[B, k, 9]`` the classifier reads: :meth:`encode`, then :meth:`refine`."""
        return self.refine(images, self.encode(images, g0, generator=generator))

    def reconstruct(self, g: Tensor, height: int, width: int) -> Tensor:
        """The render ``[B, 3, H, W]`` of raw Gaussians (in float32, also under bf16 autocast; not clamped)."""
        return render(self.decode(g), height=height, width=width)

    def decode(self, g: Tensor) -> Gaussians:
        """Raw Gaussians decoded (in float32) with the encoder's scale factor."""
        return decode(g.float(), self.scale_factor)

    def forward(self, images: Tensor, g0: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Logits ``[B, classes]``."""
        return self.classifier(self.gaussians(images, g0, generator=generator))

    @torch.no_grad()
    def predict(self, images: Tensor, *, generator: torch.Generator | None = None) -> dict:
        """``logits``, the raw Gaussians ``g`` the classifier reads, their clamped render
        ``rendered`` and per-image ``psnr`` of ``images`` (moved to the model's device), and the
        per-image ``psnr_encoder`` of the encoder's own Gaussians (before test-time fitting)."""
        images = images.to(self._device())
        encoded = self.encode(images, generator=generator)
        g = self.refine(images, encoded)
        rendered = self.reconstruct(g, *images.shape[-2:]).clamp(0, 1)
        out = {"logits": self.classifier(g), "g": g, "rendered": rendered, "psnr": psnr(rendered, images)}
        out["psnr_encoder"] = (out["psnr"] if g is encoded else
                               psnr(self.reconstruct(encoded, *images.shape[-2:]).clamp(0, 1), images))
        return out
