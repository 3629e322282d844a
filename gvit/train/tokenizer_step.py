"""``model=tokenizer``: GaussianToken or the plain VQ tokenizer (:class:`gvit.models.Tokenizer`) on
reconstruction; labels unused; evaluated by reconstruction and codebook measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..guidance import PerceptualSchedule
from ..losses import RECONSTRUCTION_LOSSES, psnr, reconstruction_loss, ssim
from ..models import TOKENIZER_KINDS, Tokenizer, code_statistics, make_tokenizer
from ..settings import setting
from .base import ModelStep, as_number
from .config import TrainConfig, check_schedule, model_setting, require
from .optim import adamw, apply_gradients

__all__ = ["TokenizerConfig", "TokenizerStep", "build_tokenizer"]


@dataclass
class TokenizerConfig(PerceptualSchedule, TrainConfig):
    """The core, the reconstruction loss (pixel term, D-SSIM weight and start) and the tokenizer's keys."""

    kind = "tokenizer"
    model: str = model_setting("tokenizer")
    tokenizer: str = setting("gaussian", "vq (A, plain VQ on a grid of tokens from B's query head), vq_conv (the first "
                                         "A: a strided convolution's grid), gaussian (B, GaussianToken), "
                                         "gaussian_fixed (C, fixed geometry), gaussian_bits (D, geometry quantised "
                                         "too)", TOKENIZER_KINDS)
    num_tokens: int = setting(64, "tokens per image (a square for vq, vq_conv and gaussian_fixed)")
    codebook_size: int = setting(1024, "codes in the codebook")
    code_dim: int = setting(3, "values per code (channels of the splatted map)")
    tokenizer_channels: int = setting(64, "channels of the CNN encoder and decoder")
    tokenizer_blocks: int = setting(1, "residual blocks per resolution in encoder and decoder")
    geometry_bits: int = setting(4, "gaussian_bits: bits per geometry value")
    commitment: float = setting(0.25, "weight of the commitment loss")
    codebook_decay: float = setting(0.8, "EMA decay of the codebook")
    code_gradient: str = setting("rotation", "the encoder's gradient through the quantiser",
                                 ("rotation", "straight_through"))
    pixel_loss: str = setting("bce", "pixel term of the reconstruction loss", RECONSTRUCTION_LOSSES)

    __post_init__ = TrainConfig.__post_init__  # not the schedule's own (it runs in check)

    def check(self) -> None:
        super().check()
        check_schedule(self, PerceptualSchedule)
        require(self, positive=("num_tokens", "codebook_size", "code_dim", "tokenizer_channels", "tokenizer_blocks"))


class TokenizerStep(ModelStep):
    """``model=tokenizer``: one optimiser over the whole tokenizer (the codebook follows its EMA).
    Loss: ``pixel_loss`` + ``lambda_perc`` D-SSIM (from ``perceptual_from``) + the commitment loss."""

    settings = TokenizerConfig
    classifies = False
    tokenizes = True
    report_elsewhere = "a tokenizer checkpoint; its report is gvit tokens report"

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        self.model = build_tokenizer(cfg).to(device)
        self.parts["tokenizer"] = (self.model, adamw(cfg, self.model), "tok_opt")
        self._indices: list[Tensor] | None = None  # token indices of an evaluation in progress

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        images = self._augment(inputs, flips, gen, rank, world)
        with self.autocast():
            out = self.model(images, gen)
            rec = reconstruction_loss(out.reconstruction.float(), images, self.cfg.pixel_loss,
                                      dssim_weight=self.cfg.perceptual_weight(step, self.cfg.steps))
        loss = rec + out.commitment.float()
        ok = apply_gradients([self.parts["tokenizer"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_rec": as_number(rec), "loss_commit": as_number(out.commitment)} if ok else None

    @staticmethod
    def describe(result: dict) -> str:
        return (f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} on {result['eval_images']} images, "
                f"codebook usage {100 * result['usage']:.1f}%, perplexity {result['perplexity']:.0f}, "
                f"{result['bits_per_image']:.0f} bits per image")

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


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The :class:`Tokenizer` a config describes (weights seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return make_tokenizer(cfg.tokenizer, image_size=cfg.image_size, num_tokens=cfg.num_tokens,
                          num_codes=cfg.codebook_size, z=cfg.code_dim, channels=cfg.tokenizer_channels,
                          blocks=cfg.tokenizer_blocks, geometry_bits=cfg.geometry_bits, commitment=cfg.commitment,
                          decay=cfg.codebook_decay, gradient=cfg.code_gradient)
