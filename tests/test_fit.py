import math

import numpy as np
import pytest
import torch

from gvit.data import make_shapes
from gvit.fit import FitConfig, fit_gaussians, fit_raw, gaussians_from_segments, initialize, luminance_contribution
from gvit.fit.init import split_to_count
from gvit.gaussians import Gaussians, compact, compression_ratio, decode
from gvit.losses import psnr
from gvit.render import render


def _images(n=8, size=24, seed=0):
    return make_shapes(n, size, seed=seed)[0]


# --------------------------------------------------------------------------- initialisation


def test_grid_init_puts_cell_means_on_a_regular_grid():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = decode(initialize(x, 16, "grid"))
    centres = (torch.arange(4, dtype=torch.float64) + 0.5) / 4 * 2 - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    assert torch.allclose(g.means[0].double(), torch.stack([xx.flatten(), yy.flatten()], -1), atol=1e-4)
    cell_means = x.view(2, 3, 4, 8, 4, 8).mean((3, 5)).flatten(2).transpose(1, 2)  # [B, 16, 3]
    assert torch.allclose(g.colors, cell_means.clamp(1e-4, 1 - 1e-4), atol=1e-4)
    assert torch.allclose(g.scales, torch.full_like(g.scales, 0.6 * 0.5), atol=1e-5)  # 0.6 x spacing 2/4


def test_grid_init_on_non_square_images_follows_the_aspect_ratio():
    x = torch.rand(1, 3, 24, 48)
    g = decode(initialize(x, 32, "grid"))
    assert len(g.means[0, :, 0].unique()) == 8 and len(g.means[0, :, 1].unique()) == 4
    g = decode(initialize(x, 30, "grid"))  # 32 cells, two dropped
    assert g.means.shape == (1, 30, 2)


@pytest.mark.parametrize("method", ["random", "grid", "kmeans", "superpixel", "detail"])
@pytest.mark.parametrize("size,k", [((24, 24), 64), ((5, 7), 64), ((12, 20), 3)])
def test_every_init_gives_k_finite_gaussians(method, size, k):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    raw = initialize(x, k, method, scale_factor=0.5)
    assert raw.shape == (2, k, 9) and torch.isfinite(raw).all()
    g = decode(raw, 0.5)
    assert (g.scales < 0.5).all() and (g.means.abs() <= 1).all()


@pytest.mark.parametrize("method", ["kmeans", "superpixel"])
def test_segment_inits_start_closer_than_random(method):
    x = _images(6, 24)
    start = {m: psnr(render(decode(initialize(x, 64, m)), height=24, width=24), x).mean() for m in ("random", method)}
    assert start[method] > start["random"] + 3


def test_gaussians_from_segments_matches_numpy_moments():
    h, w = 9, 11
    seg = torch.zeros(1, h, w, dtype=torch.long)
    ii, jj = np.mgrid[0:h, 0:w]
    diagonal = np.abs(ii - jj * h / w) < 1.5  # a thin diagonal band is segment 1
    seg[0][torch.from_numpy(diagonal)] = 1
    img = torch.zeros(1, 3, h, w)
    img[0, 0][torch.from_numpy(diagonal)] = 1.0
    img[0, 2] = 0.25
    g = gaussians_from_segments(img, seg, 3)
    # label 2 is empty: invisible and last; the band (smaller) comes before the background
    assert g.opacities[0, 2] < 0.01 and g.opacities[0, :2].min() > 0.9
    band = 0 if diagonal.sum() < (~diagonal).sum() else 1
    xs, ys = (2 * jj + 1) / w - 1, (2 * ii + 1) / h - 1
    px, py = xs[diagonal], ys[diagonal]
    cov = np.cov(np.stack([px, py]), bias=True) + np.diag([(2 / w) ** 2 / 12, (2 / h) ** 2 / 12])
    evals, evecs = np.linalg.eigh(cov)
    got = g[0]
    assert np.allclose(got.means[0, band].numpy(), [px.mean(), py.mean()], atol=1e-6)
    assert np.allclose(got.scales[0, band].numpy(), 2 * np.sqrt(evals[::-1]), atol=1e-5)
    major = evecs[:, -1]
    phi = float(got.angles[0, band])
    assert abs(abs(math.cos(phi) * major[0] + math.sin(phi) * major[1]) - 1) < 1e-6
    assert np.allclose(got.colors[0, band].numpy(), [1.0, 0.0, 0.25], atol=1e-6)


def test_split_to_count_gives_exactly_k_nonempty_labels():
    labels = torch.zeros(10, 13, dtype=torch.long)
    labels[:, 7:] = 1
    out = split_to_count(labels, 17)
    assert out.max() == 16 and torch.bincount(out.flatten()).min() >= 1
    # splitting never merges: each new label lies inside one old label
    for lab in range(17):
        assert len(labels[out == lab].unique()) == 1


# --------------------------------------------------------------------------- fitting


def test_fitting_improves_and_grid_beats_random():
    x = _images(8, 24)
    res = {m: fit_gaussians(x, num_gaussians=64, iters=120, init=m) for m in ("random", "grid")}
    start = psnr(render(decode(initialize(x, 64, "grid")), height=24, width=24), x)
    assert (res["grid"].psnr > start + 5).all()
    assert res["grid"].psnr.mean() > res["random"].psnr.mean() + 3
    assert res["grid"].raw.shape == (8, 64, 9) and res["grid"].gaussians.valid is None
    assert res["grid"].history[-1][0] == 120 and res["grid"].iters.tolist() == [120] * 8


def test_images_in_a_batch_are_fitted_independently():
    x = _images(3, 16, seed=4)
    cfg = FitConfig(num_gaussians=24, iters=25, init="grid")
    together = fit_gaussians(x, cfg).raw
    alone = torch.cat([fit_gaussians(x[i:i + 1], cfg).raw for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4, rtol=1e-4)


def test_fit_raw_returns_the_values_fit_gaussians_fits_and_refuses_pruning():
    x = _images(3, 16, seed=5)
    start = initialize(x, 24, "grid")
    cfg = FitConfig(num_gaussians=24, iters=12, loss="mse", warmup=0.0)
    full = fit_gaussians(x, cfg, init_raw=start)
    raw = fit_raw(x, cfg, init_raw=start)
    assert torch.equal(raw, full.raw) and not torch.equal(raw, start)
    with pytest.raises(ValueError, match="fit_raw: this config prunes or grows"):
        fit_raw(x, cfg, prune_tau=0.3)
    with pytest.raises(ValueError, match="fit_raw: this config prunes or grows"):
        fit_raw(x, cfg, grow_from=0.5)


def test_target_psnr_stops_images_early_and_keeps_what_reached_it():
    x = _images(4, 16, seed=2)
    res = fit_gaussians(x, num_gaussians=48, iters=300, target_psnr=26.0, check_every=5)
    assert (res.iters < 300).all() and (res.iters % 5 == 0).all()
    # the returned Gaussians are the ones that reached the target
    assert (res.psnr >= 26.0 - 1e-3).all()
    assert (res.psnr < 40).all()  # and not a fully converged fit


def test_bce_and_dssim_losses_fit_too():
    x = _images(2, 16)
    res = fit_gaussians(x, num_gaussians=32, iters=60, loss="bce", dssim_weight=0.2)
    assert res.psnr.mean() > 20


def test_pruning_leaves_fewer_gaussians_and_a_consistent_mask():
    x = _images(4, 24, seed=5)
    res = fit_gaussians(x, num_gaussians=96, iters=120, l1_opacity=0.01, prune_tau=0.3, prune_at=0.5)
    g = res.gaussians
    assert g.valid is not None and g.valid.dtype == torch.bool
    counts = res.gaussians.counts()
    assert (counts < 96).all() and (counts >= 1).all()
    assert torch.isfinite(res.psnr_before_prune).all()
    # the mask is what the render honours: compacting changes nothing
    small = compact(g)
    assert small.num_gaussians == int(counts.max())
    assert torch.equal(small.counts(), counts)
    full, cut = render(g, height=24, width=24), render(small, height=24, width=24)
    assert torch.allclose(full, cut, atol=1e-6)
    assert res.psnr.mean() > 20


def test_compact_keeps_order_and_pads_with_invalid_slots():
    g = Gaussians(means=torch.arange(10.0).view(2, 5, 1).expand(2, 5, 2) / 10, scales=torch.full((2, 5, 2), 0.1),
                  angles=torch.zeros(2, 5), colors=torch.rand(2, 5, 3), opacities=torch.rand(2, 5),
                  valid=torch.tensor([[True, False, True, False, False], [False, True, True, True, False]]))
    c = compact(g)
    assert c.num_gaussians == 3
    assert c.valid.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(c.means[0, :2, 0], torch.tensor([0.0, 0.2]))
    assert torch.allclose(c.means[1, :, 0], torch.tensor([0.6, 0.7, 0.8]))


def test_luminance_contribution_equals_the_change_when_removed():
    gen = torch.Generator().manual_seed(3)
    b, k, h, w = 2, 6, 13, 17
    g = Gaussians(means=torch.rand(b, k, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.7,
                  scales=torch.rand(b, k, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.1,
                  angles=torch.rand(b, k, generator=gen, dtype=torch.float64) * 3,
                  colors=torch.rand(b, k, 3, generator=gen, dtype=torch.float64),
                  opacities=torch.rand(b, k, generator=gen, dtype=torch.float64) * 0.6 + 0.1)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    for mode in ("alpha", "sum"):
        got = luminance_contribution(g, height=h, width=w, mode=mode)
        total = (render(g, height=h, width=w, mode=mode) * luma).flatten(1).sum(1)
        for i in range(k):
            without = Gaussians(g.means, g.scales, g.angles, g.colors, g.opacities.clone())
            without.opacities[:, i] = 0
            ref = (total - (render(without, height=h, width=w, mode=mode) * luma).flatten(1).sum(1)).abs()
            assert torch.allclose(got[:, i], ref, rtol=1e-9, atol=1e-12), (mode, i)


def test_compression_ratio():
    r = compression_ratio(torch.tensor([256, 64]), 32, 32)
    assert torch.allclose(r, torch.tensor([3072 / (256 * 18), 3072 / (64 * 18)], dtype=torch.float64))
    assert compression_ratio(torch.tensor([100]), 10, 10, bytes_per_value=4).item() == pytest.approx(300 / 3600)


def test_gradient_magnitude_of_a_ramp_by_hand():
    from gvit.fit.init import gradient_magnitude

    ramp = torch.linspace(0, 1, 9).expand(1, 3, 5, 9)  # every channel rises 1/8 per column
    g = gradient_magnitude(ramp)
    assert torch.allclose(g[0, :, 1:-1], torch.full((5, 7), math.sqrt(3) / 8))  # central differences
    assert torch.allclose(g[0, :, 0], torch.full((5,), math.sqrt(3) / 16))  # edge replicated: half a step


def test_detail_init_gathers_gaussians_where_the_image_changes():
    import gvit.fit.init as init

    x = torch.full((1, 3, 32, 64), 0.5)
    ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x[0, :, :, 32:] = ((ii + jj) % 2).float()  # right half: a one-pixel checkerboard; left half flat
    g = init._detail_init(x, 400, torch.Generator().manual_seed(0))
    right = g.means[0, :, 0] > 0
    share = init.DETAIL_SHARE + (1 - init.DETAIL_SHARE) / 2  # expected share of centres on the right
    assert abs(float(right.float().mean()) - share) < 0.06
    assert g.scales[0, right, 0].mean() < g.scales[0, ~right, 0].mean()  # denser there: smaller
    assert torch.all(g.scales[0, 1:, 0] >= g.scales[0, :-1, 0])  # small in front of large
    cols = ((g.means[0, :, 0] + 1) * 32 - 0.5).round().long()  # each colour is its centre's pixel
    rows = ((g.means[0, :, 1] + 1) * 16 - 0.5).round().long()
    assert torch.allclose(g.colors[0], x[0, :, rows, cols].T)
    pixels = init._detail_init(torch.rand(1, 3, 4, 4), 20, torch.Generator().manual_seed(0))
    assert (pixels.opacities[0, 16:] < 0.01).all() and pixels.means.shape == (1, 20, 2)  # more Gaussians than pixels


def test_coarse_to_fine_renders_the_first_iterations_at_half_resolution(monkeypatch):
    import gvit.fit.core as core

    sizes = []
    real = core.render

    def spy(g, **kw):
        sizes.append((kw["height"], kw["width"]))
        return real(g, **kw)

    monkeypatch.setattr(core, "render", spy)
    x = _images(2, 15)
    res = fit_gaussians(x, FitConfig(num_gaussians=16, iters=10, coarse_until=0.4), progress=False)
    assert sizes[:4] == [(8, 8)] * 4 and set(sizes[4:]) == {(15, 15)}  # the final render too
    assert res.rendered.shape == (2, 3, 15, 15) and torch.isfinite(res.psnr).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value", [("init", "spiral"), ("iters", -1), ("num_gaussians", 0), ("loss", "huber"),
                                         ("prune_tau", -0.1), ("lr_position", float("nan")), ("mode", "max"),
                                         ("coarse_until", 1.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FitConfig(**{field: value})


def test_bad_images_are_refused():
    good = torch.rand(1, 3, 8, 8)
    for bad, match in [(torch.rand(3, 8, 8), r"\[B, 3, H, W\]"), (torch.rand(1, 4, 8, 8), r"\[B, 3, H, W\]"),
                       (good * 2, r"\[0, 1\]"), (good.masked_fill(good > 0.5, float("nan")), "NaN"),
                       ((good * 255).to(torch.uint8), "floating point")]:
        with pytest.raises(ValueError, match=match):
            fit_gaussians(bad, iters=1)
    with pytest.raises(ValueError, match="init_raw"):
        fit_gaussians(good, num_gaussians=4, iters=1, init_raw=torch.zeros(1, 5, 9))


def test_auto_batch_size_follows_image_size_and_k_within_bounds():
    from gvit.fit import auto_batch_size

    small, large, huge = (
        auto_batch_size(32, 32, 256),
        auto_batch_size(512, 512, 16384),
        auto_batch_size(8000, 8000, 10**6),
    )
    assert small == 256 and 1 <= huge <= large <= small
    assert auto_batch_size(32, 32, 256, most=16) == 16
