"""Fitting Gaussians to images: :mod:`~gvit.fit.init` (initialisations), :mod:`~gvit.fit.recipes` (the
settings by image size), :mod:`~gvit.fit.core` (``FitConfig``, batched optimisation, pruning, the adaptive
budget, the projection hook) and :mod:`~gvit.fit.memory` (batch sizes that fit in memory)."""

from .budget import grow_schedule, luminance_contribution
from .core import FitConfig, FitResult, Projection, fit_gaussians, fit_raw
from .recipes import PHOTO_PIXELS, PHOTO_SPACING, RECIPES, recipe_values
from .init import INITS, gaussians_at_error, gaussians_from_segments, initialize
from .memory import auto_batch_size, check_memory

__all__ = ["INITS", "RECIPES", "PHOTO_PIXELS", "PHOTO_SPACING", "recipe_values", "FitConfig", "FitResult", "Projection",
           "fit_gaussians", "fit_raw", "initialize", "luminance_contribution", "gaussians_from_segments",
           "gaussians_at_error", "grow_schedule", "auto_batch_size", "check_memory"]
