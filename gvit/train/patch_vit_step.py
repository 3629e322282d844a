"""``model=patch_vit``: the patch ViT on pixels, the baseline of every GViT comparison."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import PatchViT
from .base import ModelStep
from .config import ClassifierSettings, TrainConfig, model_setting
from .optim import adamw

__all__ = ["PatchViTConfig", "PatchViTStep"]


@dataclass
class PatchViTConfig(ClassifierSettings, TrainConfig):
    """The core and the classifier section."""

    kind = "patch_vit"
    model: str = model_setting("patch_vit")


class PatchViTStep(ModelStep):
    settings = PatchViTConfig

    def __init__(self, cfg: PatchViTConfig, num_classes, device):
        super().__init__(cfg, num_classes, device)
        torch.manual_seed(cfg.seed)
        model = PatchViT(cfg.image_size, cfg.patch, num_classes, cfg.classifier_size, pool=cfg.pool,
                         drop_path=cfg.drop_path).to(device)
        self.parts["classifier"] = (model, adamw(cfg, model, cfg.layer_decay), "cls_opt")

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        images = self._augment(inputs, flips, gen, rank, world)
        return self._classifier_step(lambda: self.classifier(images), labels)

    def evaluate_batch(self, inputs, gen):
        return self.classifier(inputs.to(self.device)), {}
