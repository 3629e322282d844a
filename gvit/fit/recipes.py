"""The fitting recipes: the values of the settings a :class:`gvit.fit.FitConfig` leaves unset, by image size.

``small`` is the recipe every CIFAR-sized figure was measured with; ``photo`` was chosen on 3 CBSD68
photos (33 trials, docs/results/fitting.md). ``recipe="auto"`` picks ``photo`` from :data:`PHOTO_PIXELS` up.
"""

from __future__ import annotations

import math

__all__ = ["RECIPES", "PHOTO_PIXELS", "PHOTO_SPACING", "recipe_values"]

# The recipes: the values of the settings a config leaves unset. "small" is the recipe every CIFAR-sized
# figure was measured with; "photo" was chosen on 3 CBSD68 photos (33 trials, docs/results/fitting.md).
RECIPES = {
    "small": dict(iters=500, lr_position=0.1, lr_scale=0.05, lr_angle=0.05, lr_color=0.05, lr_opacity=0.05,
                  warmup=0.02, final_lr_fraction=0.01, grow_from=1.0),
    "photo": dict(iters=160, lr_position=1.0, lr_scale=0.1, lr_angle=0.1, lr_color=0.1, lr_opacity=0.1,
                  warmup=0.0, final_lr_fraction=0.05, grow_from=0.2),
}
PHOTO_PIXELS = 256 * 256  # recipe "auto": images with at least this many pixels are fitted as photos
# "photo" was chosen at 4-5 pixels between Gaussians (k = 5,500-9,000 on 481x321); a denser budget
# takes smaller position steps and more of them, both in proportion to PHOTO_SPACING / spacing
# (chosen on the same 3 photos at k = 30,000, docs/results/fitting.md)
PHOTO_SPACING = 4.0


def recipe_values(name: str, height: int, width: int, num_gaussians: int) -> dict:
    """The settings recipe ``name`` gives a ``height x width`` image with ``num_gaussians``: :data:`RECIPES`,
    and for ``photo`` with a mean spacing sqrt(H W / k) under :data:`PHOTO_SPACING` pixels, the
    iterations times PHOTO_SPACING / spacing and the position step divided by it."""
    values = dict(RECIPES[name])
    spacing = math.sqrt(height * width / num_gaussians)
    if name == "photo" and spacing < PHOTO_SPACING:
        denser = PHOTO_SPACING / spacing
        values.update(iters=int(round(values["iters"] * denser)), lr_position=values["lr_position"] / denser)
    return values
