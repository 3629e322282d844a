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

from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.shards import ShardDataset
from ..data.transforms import crop_boxes, resized_crop
from ..gaussians import decode
from ..guidance import Phase, Phases, batch_losses, guidance_backward
from ..losses import psnr, reconstruction_loss, ssim
from ..models import GaussianClassifier, GaussianEncoder, GViT, PatchViT, RefinementEncoder, Tokenizer, code_statistics
from ..render import render
from .config import TrainConfig
from .data import flip_gaussians, image_collate, image_datasets, shard_datasets
from .optim import adamw, apply_gradients, learning_rate, set_learning_rate

__all__ = ["ModelStep", "PatchViTStep", "OfflineStep", "GViTStep", "TokenizerStep", "MODEL_KINDS", "model_kind",
           "model_step", "build_gvit", "build_tokenizer"]


def _num(t: Tensor) -> float:
    return float(t.detach())


class ModelStep:
    """A model kind: ``parts`` maps checkpoint names to ``(module, optimizer, optimizer name)``."""

    reads_images = True  # its inputs are images (False: saved Gaussians)

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.parts: dict[str, tuple[nn.Module, torch.optim.Optimizer, str]] = {}

    # -- data
    @staticmethod
    def datasets(cfg: TrainConfig) -> tuple:
        """``(train, test or None)``."""
        return image_datasets(cfg)

    @staticmethod
    def collate(cfg: TrainConfig):
        return image_collate(cfg.image_size)

    # -- schedule: a single classifier trains from the first step, with no guidance
    def phases(self) -> Phases:
        return self.cfg.phase_settings(classifier_from=0.0, pretrain_until=None, guidance_from=1.0)

    # -- state
    @property
    def classifier(self) -> nn.Module:
        return self.parts["classifier"][0]

    def modules(self) -> list[nn.Module]:
        return [module for module, _, _ in self.parts.values()]

    def state_dict(self) -> dict:
        state = {}
        for name, (module, opt, opt_name) in self.parts.items():
            state[name], state[opt_name] = module.state_dict(), opt.state_dict()
        return state

    def load_state_dict(self, state: dict, *, optimizers: bool = True) -> None:
        for name, (module, opt, opt_name) in self.parts.items():
            if name not in state:
                raise ValueError(f"the checkpoint has no {name} weights")
            module.load_state_dict(state[name])
            if optimizers:
                opt.load_state_dict(state[opt_name])

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    # -- one step
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def step(self, step: int, inputs, labels: Tensor, gen: torch.Generator, rank: int, world: int,
             phase: Phase) -> dict | None:
        """One optimisation step; returns its metrics, or None when it was skipped (NaN/inf)."""
        lr = learning_rate(self.cfg, step)
        for name, (_, opt, _) in self.parts.items():
            if name == "classifier":  # warmed up from the step it starts training
                start = self.phases().classifier_start(self.cfg.steps)
                set_learning_rate([opt], learning_rate(self.cfg, step, start) * self.cfg.classifier_lr_scale)
            else:
                set_learning_rate([opt], lr)
        # randomness of step s is drawn for the whole global batch from (seed, s), then sliced like the data
        flips = (torch.rand(self.cfg.batch_size, generator=gen) < 0.5)[rank::world] & self.cfg.hflip
        metrics = self._step(inputs, labels.to(self.device), flips, gen, rank, world, phase)
        return None if metrics is None else {"phase": phase.name, "lr": lr} | metrics

    def _augment(self, images: Tensor, flips: Tensor, gen: torch.Generator, rank: int, world: int) -> Tensor:
        size = self.cfg.image_size
        boxes = crop_boxes(self.cfg.batch_size, size, size, scale=(self.cfg.crop_scale_min, 1.0),
                           generator=gen)[rank::world]
        images = resized_crop(images, boxes, (size, size))
        return torch.where(flips[:, None, None, None], images.flip(-1), images).to(self.device)

    def _classifier_step(self, logits_fn, labels: Tensor) -> dict | None:
        with self.autocast():
            loss = F.cross_entropy(logits_fn(), labels)
        ok = apply_gradients([self.parts["classifier"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_cls": _num(loss)} if ok else None

    def _step(self, inputs, labels, flips, gen, rank, world, phase) -> dict | None:
        raise NotImplementedError

    def attach_training_set(self, dataset, collate) -> None:
        """The training set, for steps that read more than their batch (called once by the loop)."""

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        """Top-1 accuracy and the means of :meth:`evaluate_batch`'s per-image measures on
        ``dataset``; g0 and other randomness come from a generator seeded by the config's seed, so
        evaluation is deterministic."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, collate_fn=collate,
                                             num_workers=self.cfg.num_workers)
        correct, total, measures = 0, 0, {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.train(False)
        for inputs, labels in loader:
            logits, per_image = self.evaluate_batch(inputs, gen)
            if logits is not None:
                correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += len(labels)
            for name, values in per_image.items():
                measures.setdefault(name, []).append(values.float().cpu())
        self.train(True)
        result = {"top1": correct / max(1, total)} if logits is not None else {}
        result["eval_images"] = total
        result.update({name: float(torch.cat(values).mean()) for name, values in measures.items()})
        return result

    def evaluate_batch(self, inputs, gen: torch.Generator) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``(logits or None, per-image measures by name)`` of one evaluation batch (for GViT ``psnr``
        and ``psnr_encoder``; for the tokenizer no logits and its reconstruction measures)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_images(self, images: Tensor, gen: torch.Generator) -> dict:
        """What the model makes of ``images [B, 3, S, S]``: ``logits`` (and, for GViT, ``g``,
        ``rendered`` and ``psnr``)."""
        if not self.reads_images:
            raise ValueError(f"model={self.cfg.model} reads saved Gaussians, not images")
        return {"logits": self.evaluate_batch(images, gen)[0]}


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
        loss, metrics, trained = out.reconstruction, {"loss_rec": _num(out.reconstruction)}, [encoder]
        if out.classification is not None:
            loss = loss + phase.lambda_cls * out.classification
            metrics["loss_cls"] = _num(out.classification)
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
        metrics = {"loss_rec": _num(out.reconstruction), "loss_cls": _num(out.classification)}
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
                "guide_shift_px": _num((new.means - old.means).norm(dim=-1).mean() * pixels),
                "guide_color": _num((new.colors - old.colors).abs().mean()),
                "guide_dloss_cls": _num(after.classification - out.classification),
                "guide_dloss_rec": _num(after.reconstruction - out.reconstruction)}

    def evaluate_batch(self, inputs, gen):
        out = self.model.predict(inputs, generator=gen)
        return out["logits"], {"psnr": out["psnr"], "psnr_encoder": out["psnr_encoder"]}

    def predict_images(self, images, gen):
        return self.model.predict(images, generator=gen)


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
        return {"loss_rec": _num(rec), "loss_commit": _num(out.commitment)} if ok else None

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


def build_gvit(cfg: TrainConfig, num_classes: int) -> GViT:
    """The :class:`GViT` a config describes (weights seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    classifier = gaussian_classifier(cfg, num_classes)
    if cfg.encoder == "refine":
        encoder = RefinementEncoder(cfg.image_size, cfg.num_gaussians, cfg.encoder_size, rounds=cfg.refine_rounds,
                                    depth=cfg.refine_depth, residual=cfg.refine_residual, features=cfg.refine_features,
                                    scale_factor=cfg.scale_factor)
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
                                           "tokenizer": TokenizerStep}


def model_kind(cfg: TrainConfig) -> type[ModelStep]:
    """The kind of ``cfg.model`` (the one place that maps a model name to what it is)."""
    return MODEL_KINDS[cfg.model]


def model_step(cfg: TrainConfig, num_classes: int, device) -> ModelStep:
    """A fresh step object (models and optimisers) of ``cfg.model``."""
    return model_kind(cfg)(cfg, num_classes, torch.device(device))
