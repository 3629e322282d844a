import numpy as np
import torch

from gvit.gaussians import Gaussians
from gvit.viz import draw_ellipses, ellipse_polygons


def _one(mx, my, sx, sy, angle=0.0, n=1):
    return Gaussians(means=torch.tensor([[[mx, my]]] * n).view(1, n, 2),
                     scales=torch.tensor([[[sx, sy]]] * n).view(1, n, 2),
                     angles=torch.full((1, n), angle), colors=torch.rand(1, n, 3), opacities=torch.full((1, n), 0.9))


def test_ellipse_outline_is_two_sigma_in_pixel_units():
    g = _one(0.0, 0.0, 0.25, 0.125, angle=0.3)
    poly = ellipse_polygons(g, 40, 80, points=64)[0, 0].double()
    # back to normalised coordinates, rotate into the Gaussian's frame: (u / 2sx)^2 + (v / 2sy)^2 = 1
    x, y = poly[:, 0] / 80 * 2 - 1, poly[:, 1] / 40 * 2 - 1
    c, s = np.cos(0.3), np.sin(0.3)
    u, v = c * x + s * y, -s * x + c * y
    assert torch.allclose((u / 0.5) ** 2 + (v / 0.25) ** 2, torch.ones(64, dtype=torch.float64), atol=1e-6)


def test_draw_ellipses_marks_the_outline_and_scales_up():
    image = torch.zeros(3, 32, 32)
    out = draw_ellipses(image, _one(0.0, 0.0, 0.25, 0.25), color=(255, 0, 0))
    assert out.shape == (256, 256, 3)
    red = (out[..., 0] == 255) & (out[..., 1] == 0)
    ys, xs = np.nonzero(red)
    # 2 sigma = 0.5 normalised = 8 px of 32, x8 -> radius 64 px around the centre (128, 128)
    r = np.hypot(xs - 128, ys - 128)
    assert red.sum() > 100 and np.abs(r - 64).max() < 2.5


def test_many_ellipses_are_drawn_as_a_density():
    n = 2000
    g = Gaussians(means=torch.rand(1, n, 2) * 1.6 - 0.8, scales=torch.full((1, n, 2), 0.02), angles=torch.zeros(1, n),
                  colors=torch.rand(1, n, 3), opacities=torch.full((1, n), 0.9))
    out = draw_ellipses(torch.zeros(3, 64, 64), g, color=(0, 255, 0))
    assert out.shape[0] == out.shape[1] >= 256
    green = out[..., 1].astype(float)
    assert green.mean() > 20 and green[:8].mean() < green[out.shape[0] // 2 - 20: out.shape[0] // 2 + 20].mean()
