"""GViT's test-time fitting (fit_steps): what the classifier reads, where the gradients go, and the
classifier's own warm-up."""

import math
from dataclasses import replace

import pytest
import torch

from gvit.data import make_shapes
from gvit.fit import fit_gaussians
from gvit.gaussians import sample_initial
from gvit.guidance import batch_losses, guidance_backward
from gvit.losses import psnr
from gvit.models import GaussianClassifier, GViT, RefinementEncoder
from gvit.train import make_config, learning_rate, model_step
from gvit.train.loop import evaluate


def _model(fit_steps=4, seed=0):
    torch.manual_seed(seed)
    return GViT(RefinementEncoder(16, 12, "micro", rounds=1, depth=1), GaussianClassifier(12, 6, "micro"),
                g0_layout="grid", fit_steps=fit_steps)


def _batch(n=6, seed=0):
    images, labels, _ = make_shapes(n, 16, seed=seed)
    return images, labels, sample_initial(n, 12, layout="grid", generator=torch.Generator().manual_seed(seed))


def test_refine_is_fit_gaussians_from_the_encoder_output_and_improves_the_render():
    model = _model()
    images, _, g0 = _batch()
    with torch.no_grad():
        encoded = model.encode(images, g0)
        refined = model.gaussians(images, g0)
    expected = fit_gaussians(images, model.fit_config(), init_raw=encoded).raw
    assert torch.allclose(refined, expected, atol=1e-6)
    assert model.fit_config().iters == 4 and model.fit_config().lr_position == pytest.approx(0.2)

    def quality(g):
        return psnr(model.reconstruct(g, 16, 16).clamp(0, 1), images).mean()

    assert quality(refined) > quality(encoded) + 0.5
    out = model.predict(images)  # inside no_grad: the fitting steps still get their gradients
    assert out["psnr"].mean() > out["psnr_encoder"].mean() + 0.5


def test_without_fit_steps_the_classifier_reads_the_encoder_output():
    model = _model(fit_steps=0)
    images, _, g0 = _batch()
    g = model.encode(images, g0)
    assert model.refine(images, g) is g
    out = model.predict(images)
    assert torch.equal(out["psnr"], out["psnr_encoder"])


def test_the_classifier_gradient_passes_straight_through_the_fitting_steps():
    model = _model()
    images, _, g0 = _batch()
    g = model.encode(images, g0).detach().requires_grad_(True)
    weights = torch.randn_like(g)
    (model.refine(images, g) * weights).sum().backward()
    assert torch.equal(g.grad, weights)


def test_guidance_takes_rec_at_the_encoder_output_and_cls_at_the_fitted_gaussians():
    model = _model(seed=1)
    images, labels, g0 = _batch(seed=1)
    params = list(model.encoder.parameters())
    g = model.encode(images, g0)
    at = g.detach().requires_grad_(True)
    rec = batch_losses(model, images, labels, g0, pixel_loss="mse").reconstruction
    d_rec, = torch.autograd.grad(torch.nn.functional.mse_loss(model.reconstruct(at, 16, 16), images), at)
    with torch.no_grad():
        fitted = fit_gaussians(images, model.fit_config(), init_raw=at).raw
    fitted.requires_grad_(True)
    d_cls, = torch.autograd.grad(torch.nn.functional.cross_entropy(model.classifier(fitted), labels), fitted)
    expected = torch.autograd.grad(g, params, d_rec + 0.3 * d_cls, allow_unused=True)
    model.zero_grad(set_to_none=True)
    out = guidance_backward(model, images, labels, g0, gamma=0.3, pixel_loss="mse")
    assert torch.allclose(out.reconstruction, rec)
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.classifier.parameters())


@pytest.mark.parametrize("bad", [dict(fit_steps=-1), dict(fit_lr=0.0)])
def test_bad_fit_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_config(**bad)
    with pytest.raises(ValueError, match="fit_steps"):
        GViT(RefinementEncoder(16, 12, "micro"), GaussianClassifier(12, 6, "micro"), **bad)


def test_evaluation_reports_both_psnrs():
    cfg = make_config(data="shapes:64", limit_eval=16, encoder="refine", encoder_size="micro", refine_rounds=1,
                      classifier_size="micro", num_gaussians=12, image_size=16, fit_steps=3, batch_size=8)
    run = model_step(cfg, 6, "cpu")
    images, labels, _ = make_shapes(16, 16, seed=3)
    result = evaluate(run, list(zip(images, labels)), lambda items: (torch.stack([x for x, _ in items]),
                                                                     torch.stack([y for _, y in items])))
    assert result["eval_images"] == 16 and result["psnr"] > result["psnr_encoder"]


def test_learning_rate_warm_up_restarts_where_a_model_starts_training():
    cfg = make_config(steps=1000, warmup=0.05, base_lr=1e-3, batch_size=256)

    def cosine(step):  # the schedule after the warm-up
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 50) / 950))

    assert learning_rate(cfg, 0) == pytest.approx(1e-3 / 50)
    assert learning_rate(cfg, 49) == pytest.approx(1e-3)
    assert learning_rate(cfg, 400) == pytest.approx(cosine(400))
    assert learning_rate(cfg, 400, start=400) == pytest.approx(cosine(400) / 50)
    assert learning_rate(cfg, 424, start=400) == pytest.approx(cosine(424) * 25 / 50)
    assert learning_rate(cfg, 449, start=400) == pytest.approx(cosine(449))
    assert learning_rate(replace(cfg, warmup=0.0), 400, start=400) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 0.4))
    )


def test_the_gvit_classifier_warms_up_from_its_first_step():
    cfg = make_config(data="shapes:64", encoder="refine", encoder_size="micro", refine_rounds=1,
                      classifier_size="micro", num_gaussians=12, image_size=16, batch_size=8, steps=100,
                      warmup=0.1, classifier_from=0.5, pretrain_until=0.8, guidance_from=0.9, classifier_lr_scale=0.5)
    run = model_step(cfg, 6, "cpu")
    images, labels, _ = make_shapes(8, 16, seed=0)
    for step in (10, 50, 55):
        run.step(step, images, labels, torch.Generator().manual_seed(step), 0, 1)
        enc_lr = run.parts["encoder"][1].param_groups[0]["lr"]
        cls_lr = run.parts["classifier"][1].param_groups[0]["lr"]
        assert enc_lr == pytest.approx(learning_rate(cfg, step))
        assert cls_lr == pytest.approx(0.5 * learning_rate(cfg, step) * min(1.0, max(0, step - 50 + 1) / 10))
