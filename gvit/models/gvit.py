"""GViT: one owner for a Gaussian encoder, a Gaussian classifier and the encoder's random input g0.

Everything that runs a GViT on images (training, evaluation, reports, explanations, the leakage
tests) goes through :class:`GViT`: images ``[B, 3, S, S]`` in [0, 1] -> g0 (random raw Gaussians,
:func:`gvit.gaussians.sample_initial`) -> encoder -> raw Gaussians ``g [B, k, 9]`` -> classifier
-> logits, and :meth:`GViT.reconstruct` renders g for the reconstruction loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..gaussians import G0_LAYOUTS, Gaussians, decode, sample_initial
from ..losses import psnr
from ..render import render
from .encoder import GaussianEncoder
from .refiner import RefinementEncoder
from .vit import GaussianClassifier

__all__ = ["GViT"]


class GViT(nn.Module):
    """``encoder`` (:class:`GaussianEncoder` or :class:`RefinementEncoder`) + ``classifier`` (:class:`GaussianClassifier`) with the
    same k; ``g0_layout`` is how g0's means are drawn (see :func:`gvit.gaussians.sample_initial`).
    g0 is drawn on the CPU from the given generator (so a seed gives the same g0 on any device)."""

    def __init__(self, encoder: GaussianEncoder | RefinementEncoder, classifier: GaussianClassifier, *, g0_layout: str = "uniform"):
        super().__init__()
        if encoder.num_gaussians != classifier.num_gaussians:
            raise ValueError(f"GViT: the encoder predicts k = {encoder.num_gaussians} Gaussians but the classifier "
                             f"reads k = {classifier.num_gaussians}")
        if g0_layout not in G0_LAYOUTS:
            raise ValueError(f"g0_layout must be one of {', '.join(G0_LAYOUTS)}, got {g0_layout!r}")
        self.encoder, self.classifier, self.g0_layout = encoder, classifier, g0_layout

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

    def gaussians(self, images: Tensor, g0: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Raw Gaussians ``[B, k, 9]`` of ``images``; g0 is drawn from ``generator`` when not given."""
        if g0 is None:
            g0 = self.sample_g0(len(images), generator)
        return self.encoder(images, g0)

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
        """``logits``, raw Gaussians ``g``, the clamped render ``rendered`` and per-image ``psnr``
        of ``images`` (moved to the model's device)."""
        images = images.to(self._device())
        g = self.gaussians(images, generator=generator)
        rendered = self.reconstruct(g, *images.shape[-2:]).clamp(0, 1)
        return {"logits": self.classifier(g), "g": g, "rendered": rendered, "psnr": psnr(rendered, images)}
