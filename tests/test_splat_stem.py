"""GaussianVision's splat features and stem: invariances, exp(log Sigma) = Sigma, statistics, padding,
order, the three poolings, the Hilbert curve and bad inputs."""

import math

import pytest
import torch

from gvit.gaussians import Gaussians, covariance, pad
from gvit.models.splat_stem import (SplatStem, hilbert_index, splat_set_features, splat_statistics)


def _sets(b=2, k=12, seed=0, valid=None) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.rand(b, k, 2, generator=g) * 2 - 1,
                     scales=0.02 + 0.2 * torch.rand(b, k, 2, generator=g),
                     angles=torch.rand(b, k, generator=g) * 2 * math.pi, colors=torch.rand(b, k, 3, generator=g),
                     opacities=torch.rand(b, k, generator=g), valid=valid)


@pytest.mark.parametrize("mode", ["sum", "alpha"])
def test_features_are_invariant_to_angle_plus_pi_and_swapped_axes(mode):
    g = _sets()
    f = splat_set_features(g, mode)
    assert f.shape == (2, 12, 8 if mode == "sum" else 10)
    turned = Gaussians(g.means, g.scales, g.angles + math.pi, g.colors, g.opacities)
    swapped = Gaussians(g.means, g.scales.flip(-1), g.angles + math.pi / 2, g.colors, g.opacities)
    torch.testing.assert_close(splat_set_features(turned, mode), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(splat_set_features(swapped, mode), f, atol=1e-5, rtol=1e-5)


def test_log_covariance_exponentiates_back_to_sigma_in_float64():
    g = _sets()
    f = splat_set_features(Gaussians(g.means.double(), g.scales.double(), g.angles.double(), g.colors.double(),
                                      g.opacities.double()), "sum")
    logm = torch.stack([torch.stack([f[..., 2], f[..., 3]], -1), torch.stack([f[..., 3], f[..., 4]], -1)], -2)
    torch.testing.assert_close(torch.linalg.matrix_exp(logm), covariance(g.scales.double(), g.angles.double()))
    # sum mode carries the colour each splat adds; alpha mode colour, opacity and compositing order
    torch.testing.assert_close(f[..., 5:8], (g.colors * g.opacities[..., None]).double())
    a = splat_set_features(g, "alpha")
    torch.testing.assert_close(a[..., 8], g.opacities)
    torch.testing.assert_close(a[0, :, 9], torch.arange(12) / 11.0)


def test_alpha_order_counts_only_valid_splats():
    valid = torch.tensor([[True, False, True, True]])
    a = splat_set_features(_sets(1, 4, valid=valid), "alpha")
    torch.testing.assert_close(a[0, [0, 2, 3], 9], torch.tensor([0.0, 0.5, 1.0]))


def test_statistics_use_valid_splats_only_and_a_constant_gets_unit_std():
    f = torch.tensor([[[1.0, 5.0], [3.0, 5.0], [100.0, -7.0]]])
    mean, std = splat_statistics(f, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="at least one valid"):
        splat_statistics(f, torch.zeros(1, 3, dtype=torch.bool))


def test_hilbert_index_is_a_curve_through_every_cell():
    n = 16
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(xs + 0.5) / n * 2 - 1, (ys + 0.5) / n * 2 - 1], -1).reshape(-1, 2)
    d = hilbert_index(centres, order=4)
    assert sorted(d.tolist()) == list(range(n * n))
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)[d.argsort()]
    assert bool((cells.diff(dim=0).abs().sum(1) == 1).all())  # consecutive indices are neighbouring cells


@pytest.mark.parametrize("pooling", ["perceiver", "grid", "curve"])
@pytest.mark.parametrize("mode", ["sum", "alpha"])
def test_stem_gives_m_tokens_for_any_n_and_ignores_padding(pooling, mode):
    torch.manual_seed(0)
    stem = SplatStem(24, mode=mode, num_tokens=4, width=16, depth=2, heads=2, frequencies=3, pooling=pooling).eval()
    g = _sets(2, 10)
    out = stem(g)
    assert out.shape == (2, 4, 24) and torch.isfinite(out).all()
    assert stem(_sets(3, 37, seed=1)).shape == (3, 4, 24)  # any N
    padded = pad(g, 16)  # padding slots carry zeros and valid = False
    padded.means[:, 10:] = 5.0  # whatever they hold
    torch.testing.assert_close(stem(padded), out, atol=1e-5, rtol=1e-5)


def test_sum_mode_perceiver_stem_is_order_free_and_alpha_mode_is_not():
    torch.manual_seed(0)
    g = _sets(2, 10)
    perm = torch.randperm(10)
    shuffled = Gaussians(
        g.means[:, perm], g.scales[:, perm], g.angles[:, perm], g.colors[:, perm], g.opacities[:, perm]
    )
    stem = SplatStem(8, mode="sum", num_tokens=3, width=16, depth=2, heads=2).eval()
    torch.testing.assert_close(stem(shuffled), stem(g), atol=1e-5, rtol=1e-5)
    stem = SplatStem(8, mode="alpha", num_tokens=3, width=16, depth=2, heads=2).eval()
    assert not torch.allclose(stem(shuffled), stem(g), atol=1e-4)  # compositing order is information


def test_grid_pooling_averages_the_splats_of_each_cell():
    stem = SplatStem(4, mode="sum", num_tokens=4, width=8, pooling="grid").eval()
    g = _sets(1, 3)
    g.means = torch.tensor([[[-0.5, -0.5], [-0.4, -0.6], [0.5, 0.5]]])  # cells 0, 0, 3; 1 and 2 empty
    x = stem.embed(stem.features(g))
    expected = torch.stack([x[0, :2].mean(0), stem.empty, stem.empty, x[0, 2]]) + stem.slot_embed
    torch.testing.assert_close(stem(g)[0], stem.proj(stem.norm(expected)))


def test_statistics_standardise_the_inputs_and_are_saved_with_the_model():
    stem = SplatStem(8, mode="sum", num_tokens=2, width=8, depth=1, heads=2, frequencies=2)
    g = _sets(4, 20)
    mean, std = splat_statistics(splat_set_features(g, "sum"))
    stem.set_statistics(mean, std)
    x = stem.features(g)[..., :8].reshape(-1, 8)
    torch.testing.assert_close(x.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    other = SplatStem(8, mode="sum", num_tokens=2, width=8, depth=1, heads=2, frequencies=2)
    other.load_state_dict(stem.state_dict())
    torch.testing.assert_close(other.feature_std, std)
    with pytest.raises(ValueError, match="positive std"):
        stem.set_statistics(mean, -std)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match="pooling"):
        SplatStem(8, pooling="mean")
    with pytest.raises(ValueError, match="square"):
        SplatStem(8, num_tokens=6, pooling="grid")
    with pytest.raises(ValueError, match="mode"):
        splat_set_features(_sets(), "max")
    stem = SplatStem(8, num_tokens=2, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="at least one valid"):
        stem(_sets(1, 4, valid=torch.zeros(1, 4, dtype=torch.bool)))
