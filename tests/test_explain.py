import math

import pytest
import torch

from gvit.explain import cdam, cell_map, det_sigma_map
from gvit.gaussians import Gaussians
from gvit.models import GaussianClassifier


def _logit_with_token_scaled(model, g, b, i, c, factor):
    """Logit c of set b when token i fed to the last attention layer is multiplied by ``factor``."""
    def scale(module, args):
        x = args[0].clone()
        x[b, x.shape[1] - g.shape[1] + i] *= factor
        return (x, *args[1:])

    handle = model.transformer.blocks[-1].attn.register_forward_pre_hook(scale)
    try:
        with torch.no_grad():
            return float(model(g)[b, c])
    finally:
        handle.remove()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_cdam_equals_a_finite_difference_of_token_scaling(pool):
    # S_i = sum_j x_ij df/dx_ij is the derivative of f when token i is scaled by (1 + t), at t = 0
    torch.manual_seed(0)
    model = GaussianClassifier(5, 4, "micro", pool=pool).double().eval()
    g = torch.randn(2, 5, 9, dtype=torch.float64)
    scores, target = cdam(model, g, target=2)
    assert scores.shape == (2, 5) and target.tolist() == [2, 2]
    eps = 1e-6
    for b in range(2):
        for i in range(5):
            fd = (_logit_with_token_scaled(model, g, b, i, 2, 1 + eps)
                  - _logit_with_token_scaled(model, g, b, i, 2, 1 - eps)) / (2 * eps)
            assert math.isclose(float(scores[b, i]), fd, rel_tol=1e-5, abs_tol=1e-8)
    assert scores.abs().max() > 1e-3  # not the degenerate S = 0 of the block's (pre-LayerNorm) input
    assert all(p.grad is None for p in model.parameters())
    predicted, chosen = cdam(model, g)
    assert torch.equal(chosen, model(g).argmax(-1))


def test_cell_map_matches_a_loop_and_leaves_empty_cells_zero():
    gen = torch.Generator().manual_seed(1)
    means = torch.rand(2, 30, 2, generator=gen) * 2 - 1
    means[0, 0] = torch.tensor([1.0, -1.0])  # on the border: the last column, first row
    values = torch.randn(2, 30, generator=gen)
    valid = torch.rand(2, 30, generator=gen) > 0.2
    out = cell_map(values, means, grid=4, valid=valid)
    ref = torch.zeros(2, 4, 4)
    for b in range(2):
        for i in range(30):
            if valid[b, i]:
                col = min(int((means[b, i, 0] + 1) / 2 * 4), 3)
                row = min(int((means[b, i, 1] + 1) / 2 * 4), 3)
                ref[b, row, col] += values[b, i]
    assert torch.allclose(out, ref, atol=1e-6)
    lonely = cell_map(torch.ones(1, 1), torch.tensor([[[-0.9, 0.9]]]), grid=16)
    assert lonely[0, 15, 0] == 1 and lonely.sum() == 1  # bottom-left cell only
    with pytest.raises(ValueError, match="grid"):
        cell_map(values, means, grid=0)


def test_det_sigma_map_reads_each_gaussians_pixel_area():
    # two opaque, well separated Gaussians of different sizes on a 32 x 48 image
    g = Gaussians(means=torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]]), scales=torch.tensor([[[0.05, 0.08], [0.15, 0.1]]]),
                  angles=torch.tensor([[0.3, -1.0]]), colors=torch.zeros(1, 2, 3), opacities=torch.ones(1, 2))
    out = det_sigma_map(g, 32, 48)
    assert out.shape == (1, 32, 48)
    for (x, y), (sx, sy) in zip(g.means[0].tolist(), g.scales[0].tolist()):
        col, row = int((x + 1) / 2 * 48), int((y + 1) / 2 * 32)
        expected = math.log((sx * 24 * sy * 16) ** 2)
        assert math.isclose(float(out[0, row, col]), expected, abs_tol=1e-3)
    assert torch.isnan(out[0, 0, 0])  # far from both: not covered
    assert float(out[0, 16, 12]) < float(out[0, 16, 36])  # the small one reads smaller


def test_rank_correlation_matches_scipy_and_ignores_invalid_slots():
    from scipy.stats import spearmanr

    from gvit.explain import rank_correlation

    torch.manual_seed(0)
    a, b = torch.randn(4, 12), torch.randn(4, 12)
    b[1] = a[1] * 3 + 1  # monotone: rho = 1
    b[2] = -a[2].exp()  # anti-monotone: rho = -1
    rho = rank_correlation(a, b)
    for i in range(4):
        assert rho[i].item() == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-9)
    assert rho[1] == pytest.approx(1) and rho[2] == pytest.approx(-1)
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[0, 6:] = False
    valid[3, 2:] = False  # two slots only: undefined
    masked = rank_correlation(a, b, valid)
    assert masked[0].item() == pytest.approx(spearmanr(a[0, :6].numpy(), b[0, :6].numpy()).statistic, abs=1e-9)
    assert masked[3].isnan() and rank_correlation(a, torch.ones(4, 12))[0].isnan()


def test_mask_mass_matches_a_loop_over_the_gaussians():
    from gvit.explain import mask_mass

    torch.manual_seed(1)
    b, k, h, w = 3, 10, 8, 6
    scores, means = torch.randn(b, k), torch.rand(b, k, 2) * 2 - 1
    masks = torch.rand(b, h, w) < 0.4
    valid = torch.rand(b, k) < 0.8
    out = mask_mass(scores, means, masks, valid)
    for i in range(b):
        pos_in = pos_all = n_in = n = 0.0
        for j in range(k):
            if not valid[i, j]:
                continue
            x, y = (means[i, j, 0].item() + 1) / 2 * w, (means[i, j, 1].item() + 1) / 2 * h
            inside = bool(masks[i, min(int(y), h - 1), min(int(x), w - 1)])
            s = max(scores[i, j].item(), 0.0)
            pos_all += s
            pos_in += s * inside
            n += 1
            n_in += inside
        assert out["inside"][i].item() == pytest.approx(pos_in / pos_all)
        assert out["gaussians_inside"][i].item() == pytest.approx(n_in / n)
        assert out["area"][i].item() == pytest.approx(masks[i].float().mean().item())
    assert mask_mass(-scores.abs(), means, masks)["inside"].isnan().all()  # no positive evidence at all
