"""The refinement encoder and the splat token features."""

import math

import pytest
import torch

from gvit.gaussians import RAW_DIM, covariance, decode, sample_initial
from gvit.models import GaussianClassifier, GViT, RefinementEncoder, fourier_features, log_covariance, splat_features
from gvit.render import render


def test_log_covariance_is_the_matrix_log_and_ignores_the_axis_conventions():
    torch.manual_seed(0)
    scales, angles = torch.rand(50, 2, dtype=torch.float64) * 0.5 + 0.01, torch.randn(50, dtype=torch.float64) * 3
    m = log_covariance(scales, angles)
    mat = torch.stack([torch.stack([m[:, 0], m[:, 1]], -1), torch.stack([m[:, 1], m[:, 2]], -1)], -2)
    assert torch.allclose(torch.linalg.matrix_exp(mat), covariance(scales, angles), rtol=1e-10, atol=1e-14)
    assert torch.allclose(log_covariance(scales, angles + math.pi), m, atol=1e-10)  # angle + pi
    swapped = log_covariance(scales.flip(-1), angles + math.pi / 2)  # the axes swapped
    assert torch.allclose(swapped, m, atol=1e-10)


def test_fourier_features_and_splat_feature_layout():
    p = torch.tensor([[0.5, -0.25]])
    f = fourier_features(p, 3)
    assert f.shape == (1, 12)
    assert torch.allclose(f[0, :3], torch.sin(torch.tensor([0.5, 1.0, 2.0]) * math.pi), atol=1e-6)
    raw = torch.randn(2, 5, RAW_DIM)
    feats = splat_features(raw, 1.0, 4)
    g = decode(raw)
    assert feats.shape == (2, 5, 2 + 16 + 3 + 3 + 1)
    assert torch.allclose(feats[..., :2], g.means) and torch.allclose(feats[..., -1], g.opacities)


def test_splat_classifier_learns_from_gradients():  # padding: tests/test_neighbours.py
    torch.manual_seed(0)
    model = GaussianClassifier(6, 3, "micro", pool="mean", features="splat").eval()
    model(torch.randn(2, 6, RAW_DIM)).sum().backward()
    assert model.embed.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="features"):
        GaussianClassifier(6, 3, "micro", features="fancy")


def test_refiner_starts_at_a_coloured_grid_and_every_round_learns():
    torch.manual_seed(0)
    enc = RefinementEncoder(16, 16, "micro", rounds=2, depth=1, features=8)
    images = torch.rand(2, 3, 16, 16)
    g0 = sample_initial(2, 16, layout="grid", generator=torch.Generator().manual_seed(0))
    start = enc.start(images, g0)
    assert torch.equal(enc(images, g0), start)  # zero-initialised heads
    g = decode(start)
    assert torch.allclose(g.means, decode(g0).means, atol=1e-6)  # g0's centres are kept
    assert torch.allclose(g.scales, torch.full_like(g.scales, 0.6 * 2 / 4), atol=1e-5)  # 0.6 grid spacings (4 x 4)
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.9), atol=1e-5)
    # the colour is the image's at each centre: bilinear sample equals a direct lookup at a pixel centre
    centre = torch.tensor([[[(2 * 5 + 1) / 16 - 1, (2 * 9 + 1) / 16 - 1]]])
    one = g0[:1, :1].clone()
    one[..., :2] = torch.atanh(centre)
    small = RefinementEncoder(16, 1, "micro", rounds=1, depth=1, features=4)
    assert torch.allclose(decode(small.start(images[:1], one)).colors[0, 0], images[0, :, 9, 5].clamp(1e-3, 1 - 1e-3),
                          atol=1e-5)
    render(decode(enc(images, g0)), height=16, width=16).sum().backward()
    assert all(h.fc1.weight.grad is not None for h in enc.heads)
    assert all(h.fc2.weight.grad.abs().sum() > 0 for h in enc.heads)
    with pytest.raises(ValueError, match="g0"):
        enc(images, g0[:, :5])
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(2, 3, 12, 16), g0)


def test_gvit_with_the_refiner_gives_renders_better_than_its_start_after_training():
    torch.manual_seed(0)
    from gvit.data import make_shapes
    from gvit.losses import psnr

    images, _, _ = make_shapes(32, 16, seed=0)
    model = GViT(RefinementEncoder(16, 16, "micro", rounds=2, depth=1, features=16), GaussianClassifier(16, 6, "micro"),
                 g0_layout="grid")
    gen = torch.Generator().manual_seed(0)
    g0 = model.sample_g0(32, gen)
    before = psnr(model.reconstruct(model.encoder.start(images, g0), 16, 16).clamp(0, 1), images).mean()
    opt = torch.optim.Adam(model.encoder.parameters(), lr=3e-3)
    for _ in range(40):
        loss = (model.reconstruct(model.gaussians(images, g0), 16, 16) - images).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = psnr(model.reconstruct(model.gaussians(images, g0), 16, 16).clamp(0, 1), images).mean()
    assert after > before + 1.0


def test_training_with_the_refiner_and_splat_tokens_resumes_and_explains(tmp_path):
    from gvit.explain import explain_images
    from gvit.train import make_config, load_config, load_trained, train

    settings = dict(data="shapes:64", limit_eval=16, encoder="refine", encoder_size="micro", refine_rounds=2,
                    refine_depth=1, classifier_size="micro", image_size=16, num_gaussians=16, g0_layout="grid",
                    token_features="splat", batch_size=16, steps=6, log_every=2, guidance_from=0.5, guidance_every=2)
    a = train(make_config(**settings, out=str(tmp_path / "a")), progress=False)
    b_cfg = make_config(**settings, out=str(tmp_path / "b"))
    train(b_cfg, stop_after=3, progress=False)
    b = train(b_cfg, resume=True, progress=False)
    assert a["top1"] == b["top1"] and a["psnr"] == b["psnr"] and a["psnr"] > 10
    model = load_trained(tmp_path / "a" / "checkpoint.pt").model
    assert isinstance(model.encoder, RefinementEncoder) and model.classifier.features == "splat"
    maps = explain_images(model, torch.rand(2, 3, 16, 16), grid=4)
    assert maps["cdam"].shape == (2, 16) and torch.isfinite(maps["cdam"]).all()
    with pytest.raises(ValueError, match="encoder=refine reads the image itself"):
        load_config(None, ["encoder=refine", "sample_image=true"])


def test_refiner_with_learned_queries_starts_on_g0s_grid_learns_its_centres_and_trains(tmp_path):
    from gvit.gaussians import grid_centres
    from gvit.train import make_config, load_trained, train

    torch.manual_seed(0)
    enc = RefinementEncoder(16, 12, "micro", rounds=1, depth=1, features=8, learned_queries=True)
    # the queries sit at the centres of g0's grid cells (3 rows x 4 columns for k = 12), scaled as g0's means
    centres = decode(torch.cat([enc.queries.detach(), torch.zeros(12, 7)], -1)).means
    assert torch.allclose(centres[:4, 0], 0.95 * torch.tensor([-0.75, -0.25, 0.25, 0.75]), atol=1e-6)
    assert torch.allclose(centres[::4, 1], 0.95 * torch.tensor([-2 / 3, 0.0, 2 / 3]), atol=1e-6)
    assert torch.allclose(grid_centres(12)[5], torch.tensor([-0.25, 0.0]))
    images = torch.rand(2, 3, 16, 16)
    out = enc(images)
    assert out.shape == (2, 12, 9)
    render(decode(out), height=16, width=16).sum().backward()
    assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0  # the centres learn
    with pytest.raises(ValueError, match="learned queries"):
        enc(images, sample_initial(2, 12))
    # through the trainer: no g0 is drawn, the queries are saved and loaded with the checkpoint
    settings = dict(data="shapes:32", limit_eval=8, encoder="refine", encoder_size="micro", refine_rounds=1,
                    refine_depth=1, classifier_size="micro", image_size=16, num_gaussians=16, g0_layout="grid",
                    learned_queries=True, batch_size=8, steps=2, log_every=1)
    result = train(make_config(**settings, out=str(tmp_path / "lq")), progress=False)
    assert result["psnr"] > 5
    model = load_trained(tmp_path / "lq" / "checkpoint.pt").model
    assert model.sample_g0(2) is None and model.encoder.learned_queries
