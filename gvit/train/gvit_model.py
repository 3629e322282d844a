"""The GViT a config describes: :func:`build_gvit` (encoder and classifier) and
:func:`gaussian_classifier` (the classifier alone, also the offline kind's model)."""

from __future__ import annotations

import torch

from ..models import GaussianClassifier, GaussianEncoder, GViT, RefinementEncoder

__all__ = ["build_gvit", "gaussian_classifier"]


def build_gvit(cfg, num_classes: int) -> GViT:
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


def gaussian_classifier(cfg, num_classes: int) -> GaussianClassifier:
    return GaussianClassifier(cfg.num_gaussians, num_classes, cfg.classifier_size, pool=cfg.pool,
                              features=cfg.token_features, scale_factor=cfg.scale_factor,
                              neighbours=cfg.token_neighbours, neighbour_layers=cfg.neighbour_layers,
                              neighbour_pool=cfg.neighbour_pool, drop_path=cfg.drop_path)
