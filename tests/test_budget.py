"""The adaptive budget (gvit.fit.budget) and the fitting recipes, on small hand-made images."""

import math

import pytest
import torch

from gvit.fit import PHOTO_PIXELS, PHOTO_SPACING, RECIPES, FitConfig, fit_gaussians, gaussians_at_error, grow_schedule
from gvit.fit.budget import grow_round
from gvit.gaussians import decode, encode, Gaussians
from gvit.render import render


def _square(size=16, lo=4, hi=8):
    """Black, with a white square at rows and columns [lo, hi)."""
    x = torch.zeros(1, 3, size, size)
    x[..., lo:hi, lo:hi] = 1.0
    return x


def _pixel(xn: float, size: int) -> float:
    return (xn + 1) * size / 2 - 0.5  # normalised centre -> pixel index


def test_gaussians_at_error_land_on_the_error_with_the_pixel_colour():
    x = torch.rand(3, 12, 20)
    error = torch.zeros(12, 20)
    error[3, 5], error[7, 14], error[10, 2] = 1.0, 4.0, 0.5
    raw = gaussians_at_error(x, error, 3, width=1.5, generator=torch.Generator().manual_seed(0))
    g = decode(raw[None])
    cols = [round(_pixel(v, 20)) for v in g.means[0, :, 0].tolist()]
    rows = [round(_pixel(v, 12)) for v in g.means[0, :, 1].tolist()]
    assert sorted(zip(rows, cols)) == [(3, 5), (7, 14), (10, 2)]  # only pixels with error are drawn
    for i, (r, c) in enumerate(zip(rows, cols)):
        assert torch.allclose(g.colors[0, i], x[:, r, c], atol=1e-3)
    # sigma of 1.5 pixels on each axis, in normalised units per axis
    assert torch.allclose(g.scales[0], torch.tensor([1.5 * 2 / 20, 1.5 * 2 / 12]).expand(3, 2), atol=1e-4)
    assert torch.allclose(g.opacities, torch.full((1, 3), 0.9), atol=1e-4)


def test_gaussians_at_error_of_a_perfect_render_are_spread_uniformly():
    raw = gaussians_at_error(torch.rand(3, 8, 8), torch.zeros(8, 8), 64, width=1.0)
    g = decode(raw[None])
    assert len({(round(a, 4), round(b, 4)) for a, b in g.means[0].tolist()}) == 64  # every pixel once


def test_grow_schedule_rises_evenly_to_the_full_budget():
    assert grow_schedule(100, 0.5, 2, 0.2) == {10: 0.75, 20: 1.0}
    assert grow_schedule(160, 0.25, 3, 0.3) == {16: 0.5, 32: 0.75, 48: 1.0}
    assert grow_schedule(100, 1.0, 4, 0.5) == {}
    assert grow_schedule(160, 0.2, 2, 1.0) == pytest.approx({80: 0.6, 159: 1.0})  # the last round runs (grow_until 1)


def test_a_fit_growing_until_its_last_step_ends_with_the_whole_budget():
    res = fit_gaussians(torch.rand(1, 3, 16, 16), FitConfig(num_gaussians=20, iters=10, grow_from=0.2,
                                                            grow_until=1.0, grow_prune=0.0))
    assert int(res.gaussians.counts()[0]) == 20


def _state(target, k=8, first=4):
    """``first`` broad dark Gaussians over ``target``, the other slots off."""
    b, _, h, w = target.shape
    g = Gaussians(means=torch.rand(b, first, 2) * 1.6 - 0.8, scales=torch.full((b, first, 2), 0.3),
                  angles=torch.zeros(b, first), colors=torch.zeros(b, first, 3), opacities=torch.full((b, first), 0.5))
    raw = torch.cat([encode(g), torch.zeros(b, k - first, 9)], 1)
    valid = torch.zeros(b, k, dtype=torch.bool)
    valid[:, :first] = True
    return raw, valid


def test_a_round_adds_in_front_where_the_error_is_and_zeroes_their_state():
    target = _square(16, 4, 8)
    raw, valid = _state(target)
    old = raw[0, :4].clone()
    moments = torch.rand(1, 8, 9)
    steps = torch.full((1, 8, 1), 7.0)
    grow_round(raw, valid, (moments, steps), torch.tensor([0]), target, 1.0, scale_factor=1.0, prune_tau=0.0,
               render_kw=dict(height=16, width=16), generator=torch.Generator().manual_seed(0))
    assert valid.all()
    g = decode(raw)
    # the four new ones come first, inside the white square (the only place a dark render is wrong)
    px = _pixel(g.means[0, :4], 16)
    assert ((px >= 4 - 0.01) & (px <= 7 + 0.01)).all()
    assert torch.allclose(g.colors[0, :4], torch.ones(4, 3), atol=1e-3)
    assert torch.equal(raw[0, 4:], old)  # the old ones keep their values and order, behind
    assert (moments[0, :4] == 0).all() and (steps[0, :4] == 0).all() and (steps[0, 4:] == 7).all()


@pytest.mark.parametrize("width", [0.2, 0.5])
def test_a_round_adds_gaussians_of_width_times_the_mean_spacing(width):
    target = _square(16, 4, 8)
    raw, valid = _state(target)  # k = 8 slots on 16 x 16 pixels: a mean spacing of sqrt(256 / 8) pixels
    grow_round(raw, valid, (), torch.tensor([0]), target, 1.0, scale_factor=1.0, prune_tau=0.0,
               render_kw=dict(height=16, width=16), generator=torch.Generator().manual_seed(0), width=width)
    sigma_px = decode(raw).scales[0, :4] * 16 / 2  # normalised units -> pixels
    assert torch.allclose(sigma_px, torch.full((4, 2), width * math.sqrt(256 / 8)), rtol=1e-3)


def test_a_round_moves_gaussians_that_contribute_nothing():
    target = _square(16, 4, 8)
    raw, valid = _state(target, k=4, first=4)
    raw[0, 2, 8] = -30.0  # opacity ~0: contributes nothing
    kept = raw[0, [0, 1, 3]].clone()
    grow_round(raw, valid, (), torch.tensor([0]), target, 1.0, scale_factor=1.0, prune_tau=0.05,
               render_kw=dict(height=16, width=16), generator=torch.Generator().manual_seed(0))
    assert valid.all()
    g = decode(raw)
    px = _pixel(g.means[0, 0], 16)  # the moved one, now in front, on the square
    assert ((px >= 4 - 0.01) & (px <= 7 + 0.01)).all() and g.opacities[0, 0] > 0.5
    assert torch.equal(raw[0, 1:], kept)


def test_the_adaptive_budget_ends_at_k_and_beats_a_fixed_budget_on_sparse_detail():
    torch.manual_seed(0)
    x = torch.full((2, 3, 32, 32), 0.2)
    for i, (r, c) in enumerate([(3, 5), (20, 9), (11, 27), (28, 24), (6, 17), (25, 3)]):
        x[0, :, r:r + 2, c:c + 2] = torch.tensor([1.0, 0.5 * (i % 2), 0.0]).view(3, 1, 1)
    x[1] = x[0].flip(-1)
    kw = dict(num_gaussians=24, iters=150, recipe="photo")  # the photo recipe's budget rounds, on a toy
    fixed = fit_gaussians(x, grow_from=1.0, **kw)
    grown = fit_gaussians(x, grow_from=0.25, **kw)
    assert grown.gaussians.counts().tolist() == [24, 24]  # every slot in use: a fixed budget's files
    assert torch.isfinite(grown.raw).all()
    assert (grown.psnr > fixed.psnr + 2.0).all()  # measured: +5.7 and +4.2 dB


def test_a_target_psnr_stops_a_simple_image_with_fewer_gaussians():
    flat = torch.full((1, 3, 24, 24), 0.4)
    busy = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    res = fit_gaussians(torch.cat([flat, busy]), num_gaussians=64, iters=200, recipe="small", target_psnr=30.0,
                        grow_from=0.25, grow_rounds=6, grow_until=0.6, check_every=5)
    counts = res.gaussians.counts()
    assert counts[0] < counts[1] and counts[0] <= 16 + 8  # stopped at or just after the first round
    assert res.psnr[0] >= 30.0 and res.iters[0] < res.iters[1]


def test_recipes_fill_only_the_unset_settings_by_image_size():
    cfg = FitConfig(num_gaussians=9000)
    small, photo = cfg.for_image(32, 32), cfg.for_image(500, 500)
    assert (small.recipe, photo.recipe) == ("small", "photo")
    assert all(getattr(small, name) == value for name, value in RECIPES["small"].items())
    assert all(getattr(photo, name) == value for name, value in RECIPES["photo"].items())
    assert FitConfig().for_image(256, 255).recipe == "small" and 256 * 256 == PHOTO_PIXELS
    assert FitConfig().for_image(256, 256).recipe == "photo"
    mine = FitConfig(iters=42, lr_position=0.3, grow_from=1.0).for_image(500, 500)
    assert (mine.iters, mine.lr_position, mine.grow_from, mine.lr_color) == (42, 0.3, 1.0, 0.1)
    assert FitConfig(recipe="small").for_image(500, 500).iters == 500
    res = fit_gaussians(_square(16), num_gaussians=8, iters=3)
    assert res.config.recipe == "small" and res.config.iters == 3 and res.config.lr_position == 0.1


def test_a_denser_photo_budget_takes_smaller_position_steps_and_more_of_them():
    h, w = 300, 400
    at_spacing = {s: FitConfig(num_gaussians=int(round(h * w / s ** 2))).for_image(h, w) for s in (6.0, 4.0, 2.0, 1.0)}
    for s in (6.0, 4.0):  # as sparse as the recipe was chosen at, or sparser: the recipe as it stands
        assert (at_spacing[s].iters, at_spacing[s].lr_position) == (RECIPES["photo"]["iters"], 1.0)
    assert PHOTO_SPACING == 4.0
    assert (at_spacing[2.0].iters, at_spacing[2.0].lr_position) == (320, 0.5)  # twice as dense along each axis
    assert (at_spacing[1.0].iters, at_spacing[1.0].lr_position) == (640, 0.25)
    assert at_spacing[1.0].lr_color == RECIPES["photo"]["lr_color"]  # the other step sizes do not depend on it
    mine = FitConfig(num_gaussians=h * w, iters=100).for_image(h, w)  # a value set by hand is kept
    assert (mine.iters, mine.lr_position) == (100, 0.25)
    assert FitConfig(num_gaussians=h * w, recipe="small").for_image(h, w).iters == 500  # small images: no change


def test_the_small_recipe_is_the_old_fixed_budget_fit():
    x = _square(16)
    a = fit_gaussians(x, num_gaussians=8, iters=20)
    b = fit_gaussians(x, FitConfig(num_gaussians=8, iters=20, recipe="small", lr_position=0.1, lr_scale=0.05,
                                   lr_angle=0.05, lr_color=0.05, lr_opacity=0.05, warmup=0.02,
                                   final_lr_fraction=0.01, grow_from=1.0))
    assert torch.equal(a.raw, b.raw) and a.gaussians.valid is None


@pytest.mark.parametrize("field,value", [("grow_from", 0.0), ("grow_from", 1.5), ("grow_rounds", 0),
                                         ("grow_until", 2.0), ("grow_prune", -1.0), ("recipe", "huge")])
def test_budget_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        FitConfig(**{field: value})


def test_render_of_a_grown_fit_honours_its_mask():
    res = fit_gaussians(_square(16), num_gaussians=12, iters=30, recipe="small", grow_from=0.5)
    assert torch.allclose(render(res.gaussians, height=16, width=16).clamp(0, 1), res.rendered, atol=1e-5)
