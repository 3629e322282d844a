"""``model=tokenizer``: GaussianToken or the plain VQ tokenizer (:class:`gvit.models.Tokenizer`) on
reconstruction; labels unused; evaluated by reconstruction and codebook measures."""

from __future__ import annotations

import torch
from torch import Tensor

from ..guidance import Phases
from ..losses import psnr, reconstruction_loss, ssim
from ..models import Tokenizer, code_statistics
from .base import ModelStep, as_number
from .config import TrainConfig
from .optim import adamw, apply_gradients

__all__ = ["TokenizerStep", "build_tokenizer"]


class TokenizerStep(ModelStep):
    """``model=tokenizer``: one optimiser over the whole tokenizer (the codebook follows its EMA).
    Loss: ``pixel_loss`` + ``lambda_perc`` D-SSIM (from ``perceptual_from``) + the commitment loss."""

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        self.model = build_tokenizer(cfg).to(device)
        self.parts["tokenizer"] = (self.model, adamw(cfg, self.model), "tok_opt")
        self._indices: list[Tensor] | None = None  # token indices of an evaluation in progress

    def phases(self) -> Phases:  # reconstruction only
        return self.cfg.phase_settings(classifier_from=1.0, pretrain_until=None, guidance_from=1.0)

    def _step(self, inputs, labels, flips, gen, rank, world, phase):
        images = self._augment(inputs, flips, gen, rank, world)
        with self.autocast():
            out = self.model(images, gen)
            rec = reconstruction_loss(out.reconstruction.float(), images, self.cfg.pixel_loss,
                                      dssim_weight=phase.lambda_perc)
        loss = rec + out.commitment.float()
        ok = apply_gradients([self.parts["tokenizer"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_rec": as_number(rec), "loss_commit": as_number(out.commitment)} if ok else None

    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        """Per-image means of ``psnr``, ``ssim``, ``l1`` and ``coverage`` (fraction of map cells that
        some token reaches: splat weight above 1/255 for Gaussian kinds, every cell for vq), and over
        the split the codebook ``usage`` and ``perplexity``; ``bits_per_image`` of the tokens."""
        self._indices = []  # filled by evaluate_batch
        try:
            result = super().evaluate(dataset, collate)
            stats = code_statistics(torch.cat(self._indices), self.model.quantizer.num_codes)
        finally:
            self._indices = None
        return result | {"usage": stats["usage"], "perplexity": stats["perplexity"],
                         "bits_per_image": self.model.bits_per_image()}

    def evaluate_batch(self, inputs, gen):
        images = inputs.to(self.device)
        out = self.model(images, gen)
        if getattr(self, "_indices", None) is not None:
            self._indices.append(out.indices.cpu())
        rec = out.reconstruction.float().clamp(0, 1)
        return None, {"psnr": psnr(rec, images), "ssim": ssim(rec, images),
                      "l1": (rec - images).abs().flatten(1).mean(1), "coverage": self.model.coverage(out)}


def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The :class:`Tokenizer` a config describes (weights seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return Tokenizer(cfg.tokenizer, image_size=cfg.image_size, num_tokens=cfg.num_tokens, num_codes=cfg.codebook_size,
                     z=cfg.code_dim, channels=cfg.tokenizer_channels, blocks=cfg.tokenizer_blocks,
                     geometry_bits=cfg.geometry_bits, commitment=cfg.commitment, decay=cfg.codebook_decay,
                     gradient=cfg.code_gradient)
