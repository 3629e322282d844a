"""One small step object per model kind, and the one place that maps ``cfg.model`` to it.

A :class:`ModelStep` builds its models and optimisers, names its datasets and collate function,
decides its phase schedule, takes one optimisation step and gives logits (and, for GViT, PSNR)
for evaluation. The loop (:mod:`gvit.train.loop`) never asks which kind it runs.

* :class:`PatchViTStep` (``model=patch_vit``): the patch ViT on pixels.
* :class:`OfflineStep` (``model=offline``): the Gaussian classifier on Gaussians saved by
  ``gvit fit-dataset``, or with ``offline_input=renders`` a patch ViT on their renders (the
  rasterisation control of the leakage tests).
* :class:`GViTStep` (``model=gvit``): :class:`gvit.models.GViT` with its phases (encoder,
  classifier pre-training, joint, constructive guidance; paper 2.2, Algorithm 1).
* :class:`TokenizerStep` (``model=tokenizer``): :class:`gvit.models.Tokenizer` (GaussianToken or
  plain VQ) on reconstruction; labels unused; evaluated by reconstruction and codebook measures.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..data.shards import ShardDataset
from ..gaussians import decode
from ..guidance import Phases, batch_losses, guidance_backward
from ..models import GaussianClassifier, GaussianEncoder, GViT, PatchViT, RefinementEncoder
from ..render import render
from .base import ModelStep, as_number
from .config import TrainConfig
from .data import flip_gaussians, shard_datasets
from .optim import adamw, apply_gradients, set_learning_rate
from .clip_step import ClipStep
from .distill_step import AlignStep, DistillStep
from .tokenizer_step import TokenizerStep, build_tokenizer

__all__ = ["ModelStep", "PatchViTStep", "OfflineStep", "GViTStep", "TokenizerStep", "ClipStep", "DistillStep", "AlignStep",
           "MODEL_KINDS", "model_kind",
           "model_step", "build_gvit", "build_tokenizer"]


class PatchViTStep(ModelStep):
    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        torch.manual_seed(cfg.seed)
        model = PatchViT(cfg.image_size, cfg.patch, num_classes, cfg.classifier_size, pool=cfg.pool).to(device)
        self.parts["classifier"] = (model, adamw(cfg, model, cfg.layer_decay), "cls_opt")

    def _step(self, inputs, labels, flips, gen, rank, world, phase):
        images = self._augment(inputs, flips, gen, rank, world)
        return self._classifier_step(lambda: self.classifier(images), labels)

    def evaluate_batch(self, inputs, gen):
        return self.classifier(inputs.to(self.device)), {}


class OfflineStep(ModelStep):
    reads_images = False

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        torch.manual_seed(cfg.seed)
        if cfg.offline_input == "renders":
            model = PatchViT(cfg.image_size, cfg.patch, num_classes, cfg.classifier_size, pool=cfg.pool)
        else:
            model = gaussian_classifier(cfg, num_classes)
        model = model.to(device)
        self.parts["classifier"] = (model, adamw(cfg, model, cfg.layer_decay), "cls_opt")

    @staticmethod
    def datasets(cfg):
        return shard_datasets(cfg)

    @staticmethod
    def collate(cfg):
        return ShardDataset.collate

    def logits(self, raw: Tensor, valid: Tensor) -> Tensor:
        """The classifier on saved Gaussians, or the patch ViT on their renders at ``image_size``."""
        raw, valid = raw.to(self.device), valid.to(self.device)
        if self.cfg.offline_input == "gaussians":
            return self.classifier(raw, valid)
        with torch.no_grad():
            g = replace(decode(raw.float(), self.cfg.scale_factor), valid=valid)
            images = render(g, height=self.cfg.image_size, width=self.cfg.image_size).clamp(0, 1)
        return self.classifier(images)

    def _step(self, inputs, labels, flips, gen, rank, world, phase):
        raw, valid = inputs
        raw = flip_gaussians(raw, flips)
        return self._classifier_step(lambda: self.logits(raw, valid), labels)

    def evaluate_batch(self, inputs, gen):
        return self.logits(*inputs), {}


class GViTStep(ModelStep):
    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        self.model = build_gvit(cfg, num_classes).to(device)
        self.parts["classifier"] = (self.model.classifier, adamw(cfg, self.model.classifier, cfg.layer_decay), "cls_opt")
        self.parts["encoder"] = (self.model.encoder, adamw(cfg, self.model.encoder), "enc_opt")
        self.training_set, self.training_collate = None, None  # attach_training_set
        self.cache = None  # (raw Gaussians [N, k, 9], labels [N]) of the frozen encoder, when cached

    def phases(self) -> Phases:
        cfg = self.cfg
        if cfg.finetune_from:  # the classifier alone, on the frozen encoder's Gaussians
            return cfg.phase_settings(perceptual_from=1.0, classifier_from=0.0, pretrain_until=1.0, guidance_from=1.0)
        return cfg.phase_settings(**({} if cfg.guidance else {"guidance_from": 1.0}))

    def starts_from(self) -> str | None:
        return self.cfg.finetune_from

    def load_pretrained(self, state: dict, log=print) -> None:
        """Encoder and classifier weights of a GViT checkpoint (``finetune_from``); the head only
        when the classes match."""
        if "encoder" not in state:
            raise ValueError("finetune_from: the checkpoint has no Gaussian encoder (not a model=gvit run)")
        self.model.encoder.load_state_dict(state["encoder"])
        try:
            if not self.model.classifier.load_backbone(state["classifier"]):
                log(f"finetune: new head for {self.model.num_classes} classes")
        except ValueError as exc:
            raise ValueError(f"finetune_from: {exc}") from None

    def attach_training_set(self, dataset, collate) -> None:
        self.training_set, self.training_collate, self.cache = dataset, collate, None

    def _step(self, inputs, labels, flips, gen, rank, world, phase):
        cfg, model = self.cfg, self.model
        if not phase.train_encoder and cfg.cache_gaussians:
            return self._cached_classifier_step(flips, gen, rank, world)
        self.cache = None  # the encoder trains again: cached Gaussians are stale
        images = self._augment(inputs, flips, gen, rank, world)
        g0 = model.sample_g0(cfg.batch_size, gen)
        g0 = None if g0 is None else g0[rank::world]
        kw = dict(pixel_loss=cfg.pixel_loss, lambda_perc=phase.lambda_perc)
        encoder, classifier = self.parts["encoder"][:2], self.parts["classifier"][:2]
        if phase.guidance:
            return self._guidance_step(images, labels, g0, kw)
        if not phase.train_encoder:  # classifier pre-training on the frozen encoder's Gaussians
            with torch.no_grad(), self.autocast():
                g = model.gaussians(images, g0)
            return self._classifier_step(lambda: model.classifier(g), labels)
        with self.autocast():
            out = batch_losses(model, images, labels, g0, classify=phase.train_classifier, **kw)
        loss, metrics, trained = out.reconstruction, {"loss_rec": as_number(out.reconstruction)}, [encoder]
        if out.classification is not None:
            loss = loss + phase.lambda_cls * out.classification
            metrics["loss_cls"] = as_number(out.classification)
            trained.append(classifier)
        return metrics if apply_gradients(trained, loss, grad_clip=cfg.grad_clip) else None

    def _cached_classifier_step(self, flips, gen, rank, world) -> dict | None:
        """A classifier step on the frozen encoder's Gaussians of ``batch_size`` training images
        drawn from the step's generator (the loader's batch is not used), flipped as the images
        would have been. The whole training set is encoded once, when the phase starts (or resumes:
        the encoder is frozen, so the cache is the same)."""
        if self.cache is None:
            self.cache = self.encode_training_set()
        raw, targets = self.cache
        index = torch.randint(len(targets), (self.cfg.batch_size,), generator=gen)[rank::world].to(raw.device)
        g = flip_gaussians(raw[index], flips.to(raw.device))
        return self._classifier_step(lambda: self.model.classifier(g), targets[index])

    @torch.no_grad()
    def encode_training_set(self) -> tuple[Tensor, Tensor]:
        if self.training_set is None:
            raise RuntimeError("cache_gaussians: the loop did not attach the training set")
        loader = torch.utils.data.DataLoader(self.training_set, batch_size=256, collate_fn=self.training_collate,
                                             num_workers=self.cfg.num_workers)
        gen = torch.Generator().manual_seed(self.cfg.seed)  # one fixed g0 draw per image
        raws, targets = [], []
        for images, labels in loader:
            with self.autocast():
                raws.append(self.model.gaussians(images.to(self.device), generator=gen).float())
            targets.append(labels.to(self.device))
        return torch.cat(raws), torch.cat(targets)

    def _guidance_step(self, images, labels, g0, kw) -> dict | None:
        """One guidance step, at ``guidance_lr`` times the peak lr when set. With ``measure_guidance``
        its metrics also carry the gradient norms of :func:`gvit.guidance.guidance_backward`, and on the same batch and g0 how far the step moved
        the Gaussians (``guide_shift_px``: mean centre shift in pixels; ``guide_color``: mean absolute
        colour change) and what it did to both losses (``guide_dloss_cls``, ``guide_dloss_rec``:
        after - before)."""
        cfg, model = self.cfg, self.model
        encoder = self.parts["encoder"][:2]
        encoder[1].zero_grad(set_to_none=True)
        with self.autocast():
            out = guidance_backward(model, images, labels, g0, gamma=cfg.gamma, measure=cfg.measure_guidance, **kw)
        metrics = {"loss_rec": as_number(out.reconstruction), "loss_cls": as_number(out.classification)}
        if cfg.guidance_lr is not None:  # the guidance step's own step size (the next step sets the schedule's)
            metrics["lr"] = cfg.base_lr * cfg.batch_size / 256 * cfg.guidance_lr
            set_learning_rate([encoder[1]], metrics["lr"])
        if not apply_gradients([encoder], None, grad_clip=cfg.grad_clip):
            return None
        if not cfg.measure_guidance:
            return metrics
        with torch.no_grad(), self.autocast():
            after = batch_losses(model, images, labels, g0, **kw)
        old, new = model.decode(out.g.detach()), model.decode(after.g)
        pixels = max(images.shape[-2:]) / 2  # normalised units -> pixels
        return {**metrics, **out.stats,
                "guide_shift_px": as_number((new.means - old.means).norm(dim=-1).mean() * pixels),
                "guide_color": as_number((new.colors - old.colors).abs().mean()),
                "guide_dloss_cls": as_number(after.classification - out.classification),
                "guide_dloss_rec": as_number(after.reconstruction - out.reconstruction)}

    def evaluate_batch(self, inputs, gen):
        out = self.model.predict(inputs, generator=gen)
        return out["logits"], {"psnr": out["psnr"], "psnr_encoder": out["psnr_encoder"]}

    def predict_images(self, images, gen):
        return self.model.predict(images, generator=gen)


def build_gvit(cfg: TrainConfig, num_classes: int) -> GViT:
    """The :class:`GViT` a config describes (weights seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    classifier = gaussian_classifier(cfg, num_classes)
    if cfg.encoder == "refine":
        encoder = RefinementEncoder(cfg.image_size, cfg.num_gaussians, cfg.encoder_size, rounds=cfg.refine_rounds,
                                    depth=cfg.refine_depth, residual=cfg.refine_residual, features=cfg.refine_features,
                                    scale_factor=cfg.scale_factor, learned_queries=cfg.learned_queries)
    else:
        encoder = GaussianEncoder(cfg.image_size, cfg.encoder_patch or cfg.patch, cfg.num_gaussians, cfg.encoder_size,
                                  learned_queries=cfg.learned_queries, sample_image=cfg.sample_image,
                                  image_colors=cfg.image_colors, scale_factor=cfg.scale_factor)
    return GViT(encoder, classifier, g0_layout=cfg.g0_layout, fit_steps=cfg.fit_steps, fit_lr=cfg.fit_lr)


def gaussian_classifier(cfg: TrainConfig, num_classes: int) -> GaussianClassifier:
    return GaussianClassifier(cfg.num_gaussians, num_classes, cfg.classifier_size, pool=cfg.pool,
                              features=cfg.token_features, scale_factor=cfg.scale_factor,
                              neighbours=cfg.token_neighbours, neighbour_layers=cfg.neighbour_layers)


MODEL_KINDS: dict[str, type[ModelStep]] = {"gvit": GViTStep, "patch_vit": PatchViTStep, "offline": OfflineStep,
                                           "tokenizer": TokenizerStep, "clip": ClipStep,
                                           "splat_distill": DistillStep, "splat_align": AlignStep}


def model_kind(cfg: TrainConfig) -> type[ModelStep]:
    """The kind of ``cfg.model`` (the one place that maps a model name to what it is)."""
    return MODEL_KINDS[cfg.model]


def model_step(cfg: TrainConfig, num_classes: int, device) -> ModelStep:
    """A fresh step object (models and optimisers) of ``cfg.model``."""
    return model_kind(cfg)(cfg, num_classes, torch.device(device))
