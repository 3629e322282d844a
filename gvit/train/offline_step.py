"""``model=offline``: the Gaussian classifier on Gaussians saved by ``gvit fit-dataset``, or with
``offline_input=renders`` a patch ViT on their renders (the rasterisation control of the leakage
tests)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..data.shards import ShardDataset
from ..data.transforms import augment_gaussians
from ..gaussians import decode
from ..models import PatchViT
from ..render import render
from ..settings import setting
from .base import ModelStep
from .config import ClassifierSettings, GaussianFolders, GaussianTokenSettings, TrainConfig, model_setting
from .data import flip_gaussians, shard_datasets
from .gvit_model import gaussian_classifier
from .optim import adamw

__all__ = ["OfflineConfig", "OfflineStep", "OFFLINE_INPUTS"]

OFFLINE_INPUTS = ("gaussians", "renders")


@dataclass
class OfflineConfig(GaussianFolders, GaussianTokenSettings, ClassifierSettings, TrainConfig):
    """The core, the classifier and Gaussian-token sections, the Gaussian folders and what the
    classifier reads."""

    kind = "offline"
    model: str = model_setting("offline")
    offline_input: str = setting("gaussians", "the classifier reads the Gaussians, or a patch ViT their renders",
                                 OFFLINE_INPUTS)


class OfflineStep(ModelStep):
    settings = OfflineConfig
    reads_images = False

    def __init__(self, cfg: OfflineConfig, num_classes, device):
        super().__init__(cfg, num_classes, device)
        torch.manual_seed(cfg.seed)
        if cfg.offline_input == "renders":
            model = PatchViT(cfg.image_size, cfg.patch, num_classes, cfg.classifier_size, pool=cfg.pool,
                             drop_path=cfg.drop_path)
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

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        raw, valid = inputs
        raw, valid = augment_gaussians(flip_gaussians(raw, flips), valid, generator=gen,
                                       **self.cfg.gaussian_augmentation())
        return self._classifier_step(lambda: self.logits(raw, valid), labels)

    def evaluate_batch(self, inputs, gen):
        return self.logits(*inputs), {}
