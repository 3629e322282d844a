"""gvit: vision on 2D Gaussians.

Data flows one way: :mod:`gvit.gaussians` (representation) -> :mod:`gvit.render`
(rasterizer) -> :mod:`gvit.losses` -> fitting, models, training -> :mod:`gvit.cli`.
"""

from .gaussians import Gaussians, decode, encode, load_gaussians, sample_initial, save_gaussians
from .render import rasterize, render

__version__ = "0.1.0"
__all__ = ["Gaussians", "decode", "encode", "load_gaussians", "sample_initial", "save_gaussians",
           "rasterize", "render", "__version__"]
