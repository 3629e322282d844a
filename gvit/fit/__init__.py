"""Fitting Gaussians to images: :mod:`~gvit.fit.init` (initialisations) and :mod:`~gvit.fit.core`
(``FitConfig``, batched optimisation, pruning)."""

from .core import FitConfig, FitResult, auto_batch_size, check_memory, fit_gaussians, luminance_contribution
from .init import INITS, gaussians_from_segments, initialize

__all__ = ["INITS", "FitConfig", "FitResult", "fit_gaussians", "initialize", "luminance_contribution",
           "gaussians_from_segments", "auto_batch_size", "check_memory"]
