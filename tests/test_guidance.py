import copy

import pytest
import torch

from gvit.data import make_shapes
from gvit.gaussians import Gaussians, sample_initial
from gvit.guidance import Phases, batch_losses, guidance_backward
from gvit.models import GaussianClassifier, GaussianEncoder, GViT


def test_phase_schedule_as_fractions_of_training():
    phases = Phases()
    names = [phases.at(s, 100).name for s in range(100)]
    assert names[:25] == ["encoder"] * 25
    assert [phases.at(s, 100).lambda_perc for s in (0, 9, 10, 50)] == [0.0, 0.0, 0.1, 0.1]
    assert set(names[25:75]) == {"joint"}
    assert [s for s in range(100) if names[s] == "guidance"] == [84, 94]
    assert all(phases.at(s, 100).lambda_cls == 0 for s in range(25))
    g = phases.at(84, 100)
    assert g.guidance and g.train_encoder and not g.train_classifier and g.lambda_cls == 1.0
    pre = Phases(classifier_from=0.2, pretrain_until=0.5, guidance_from=0.8, guidance_every=1)
    names = [pre.at(s, 10).name for s in range(10)]
    assert names == ["encoder"] * 2 + ["classifier-pretrain"] * 3 + ["joint"] * 3 + ["guidance"] * 2
    assert not pre.at(3, 10).train_encoder and pre.at(3, 10).train_classifier
    for bad in (dict(classifier_from=0.5, pretrain_until=0.4), dict(guidance_from=1.5), dict(guidance_every=0),
                dict(gamma=-1)):
        with pytest.raises(ValueError, match="phases"):
            Phases(**bad)
    with pytest.raises(ValueError, match="step"):
        Phases().at(10, 10)


def test_phase_boundaries_in_steps_give_the_same_schedule_as_their_fractions():
    total = 6860
    in_steps = Phases(perceptual_from=343, classifier_from=800, pretrain_until=6800, guidance_from=6830,
                      guidance_every=1)
    as_fractions = Phases(perceptual_from=0.05, classifier_from=0.116618, pretrain_until=0.991253,
                          guidance_from=0.995626, guidance_every=1)
    assert [in_steps.at(s, total) for s in range(total)] == [as_fractions.at(s, total) for s in range(total)]
    assert in_steps.classifier_start(1715) == 800 and as_fractions.classifier_start(1715) == 200  # steps hold
    assert in_steps.guidance_start(1000) is None  # beyond a shorter run: no guidance phase
    for bad in (dict(classifier_from=2.5), dict(guidance_from=-3),
                dict(classifier_from=900, pretrain_until=800, guidance_from=1000)):
        with pytest.raises(ValueError, match="phases"):
            Phases(**bad)
    mixed = Phases(classifier_from=800, guidance_from=0.5)  # in order or not depends on the run's length
    with pytest.raises(ValueError, match="steps"):
        mixed.check_order(1000)
    mixed.check_order(6860)


def guidance_step(model, encoder_optimizer, images, labels, g0, *, gamma):
    """One constructive-guidance step: guidance_backward, then the encoder's optimiser step."""
    encoder_optimizer.zero_grad(set_to_none=True)
    losses = guidance_backward(model, images, labels, g0, gamma=gamma)
    encoder_optimizer.step()
    return losses


def _setup(seed=0):
    torch.manual_seed(seed)
    images, labels, _ = make_shapes(8, 16, seed=seed)
    model = GViT(GaussianEncoder(16, 4, 12, "micro"), GaussianClassifier(12, 6, "micro"))
    g0 = sample_initial(8, 12, generator=torch.Generator().manual_seed(seed))
    # a few joint steps so the encoder's residual head is no longer zero and gradients reach every layer
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        out = batch_losses(model, images, labels, g0)
        opt.zero_grad()
        (out.reconstruction + out.classification).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, images, labels, g0


def _ce_after(model, images, labels, g0, gamma, lr=1e-3):
    copy_ = copy.deepcopy(model)
    opt = torch.optim.SGD(copy_.encoder.parameters(), lr=lr)
    before = guidance_step(copy_, opt, images, labels, g0, gamma=gamma)
    with torch.no_grad():
        after = batch_losses(copy_, images, labels, g0)
    return before.classification.item(), after.classification.item(), copy_


def test_guidance_lowers_the_classification_loss_and_freezes_the_classifier():
    model, images, labels, g0 = _setup()
    encoder, classifier = model.encoder, model.classifier
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    before, guided, moved = _ce_after(model, images, labels, g0, gamma=0.1)
    _, unguided, _ = _ce_after(model, images, labels, g0, gamma=0.0)
    assert guided < before  # one small step descends the classification loss
    assert guided < unguided  # and it is the gamma * grad_cls term that does it
    assert all(torch.equal(state[k], v) for k, v in moved.classifier.state_dict().items())  # bit-identical
    assert all(p.grad is None and p.requires_grad for p in moved.classifier.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(moved.encoder.parameters(), encoder.parameters()))


def test_guidance_gradient_is_rec_plus_gamma_cls():
    model, images, labels, g0 = _setup(1)
    params = list(model.encoder.parameters())
    out = batch_losses(model, images, labels, g0)
    g_rec = torch.autograd.grad(out.reconstruction, params, retain_graph=True)
    g_cls = torch.autograd.grad(out.classification, params)
    moved = copy.deepcopy(model)
    opt = torch.optim.SGD(moved.encoder.parameters(), lr=1.0)
    guidance_step(moved, opt, images, labels, g0, gamma=0.3)
    for p0, p1, gr, gc in zip(params, moved.encoder.parameters(), g_rec, g_cls):
        assert torch.allclose(p0 - p1, gr + 0.3 * gc, atol=1e-6, rtol=1e-5)


def _encoder_gradients(model, images, labels, g0):
    """The encoder's parameters and, by hand, the gradients of the reconstruction and the
    classification loss on them (zeros where a parameter gets none)."""
    params = list(model.encoder.parameters())
    out = batch_losses(model, images, labels, g0)
    g_rec = torch.autograd.grad(out.reconstruction, params, retain_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(out.classification, params, allow_unused=True)
    return params, *([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in (g_rec, g_cls))


def _flat(gradients):
    """One vector of a list of per-parameter gradients."""
    return torch.cat([g.flatten() for g in gradients])


def test_relative_gamma_sizes_the_class_term_against_the_reconstruction_term():
    model, images, labels, g0 = _setup(3)
    params, g_rec, g_cls = _encoder_gradients(model, images, labels, g0)
    rec_norm, cls_norm = _flat(g_rec).norm(), _flat(g_cls).norm()
    assert cls_norm > 0
    scale = 0.4 * rec_norm / cls_norm  # by hand: the class term is 0.4 times the reconstruction term's size
    for measure in (True, False):  # measured or not: the same gradient
        model.encoder.zero_grad(set_to_none=True)
        out = guidance_backward(model, images, labels, g0, gamma=0.4, relative=True, measure=measure)
        for p, gr, gc in zip(params, g_rec, g_cls):
            got = torch.zeros_like(p) if p.grad is None else p.grad
            assert torch.allclose(got, gr + scale * gc, atol=1e-7, rtol=1e-5)
        if measure:
            assert out.stats["guide_cls_norm"] == pytest.approx(0.4 * out.stats["guide_rec_norm"], rel=1e-5)
            assert out.stats["guide_rec_norm"] == pytest.approx(float(rec_norm), rel=1e-4)
    model.encoder.zero_grad(set_to_none=True)  # gamma 0: reconstruction alone
    guidance_backward(model, images, labels, g0, gamma=0.0, relative=True)
    for p, gr in zip(params, g_rec):
        assert torch.allclose(torch.zeros_like(p) if p.grad is None else p.grad, gr, atol=1e-7, rtol=1e-5)


def test_moving_classifier_from_alone_keeps_pretraining_off():
    names = {Phases(classifier_from=0.5).at(s, 10).name for s in range(10)}
    assert "classifier-pretrain" not in names and Phases(classifier_from=0.5).at(5, 10).name == "joint"


def test_measured_guidance_gives_the_same_gradient_and_the_norms_of_its_parts():
    model, images, labels, g0 = _setup(2)
    params, g_rec, g_cls = _encoder_gradients(model, images, labels, g0)
    rec, cls = _flat(g_rec), 0.3 * _flat(g_cls)
    plain = guidance_backward(model, images, labels, g0, gamma=0.3)
    total = [p.grad.clone() for p in params]
    model.encoder.zero_grad(set_to_none=True)
    measured = guidance_backward(model, images, labels, g0, gamma=0.3, measure=True)
    assert plain.stats is None
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(total, params))  # same update
    stats = measured.stats
    assert stats["guide_rec_norm"] == pytest.approx(float(rec.norm()), rel=1e-4)
    assert stats["guide_cls_norm"] == pytest.approx(float(cls.norm()), rel=1e-4)
    assert stats["guide_cos"] == pytest.approx(float(torch.nn.functional.cosine_similarity(rec, cls, dim=0)), abs=1e-4)


def test_training_logs_every_guidance_step_with_its_measurements(tmp_path):
    import json

    from gvit.train import make_config, train

    cfg = make_config(data="shapes:64", limit_eval=16, encoder_size="micro", classifier_size="micro", image_size=16,
                      num_gaussians=16, batch_size=16, steps=12, log_every=100, guidance_from=0.5, guidance_every=2,
                      measure_guidance=True, out=str(tmp_path / "run"))
    train(cfg, progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    guided = [m for m in lines if m["phase"] == "guidance"]
    assert [m["step"] for m in guided] == [8, 10, 12]
    plain = make_config(**{**cfg.to_dict(), "measure_guidance": False, "out": str(tmp_path / "plain")})
    train(plain, progress=False)
    plain_lines = [json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")]
    assert [m["step"] for m in plain_lines if m["phase"] == "guidance"] == [8, 10, 12]  # logged, not measured
    assert not any(key.startswith("guide_") for m in plain_lines for key in m)
    own = make_config(**{**plain.to_dict(), "guidance_lr": 0.5, "out": str(tmp_path / "own")})
    train(own, progress=False)
    own_lines = [json.loads(line) for line in open(tmp_path / "own" / "metrics.jsonl")]
    peak = own.base_lr * own.batch_size / 256
    assert all(m["lr"] == pytest.approx(0.5 * peak) for m in own_lines if m["phase"] == "guidance")
    assert all(m["lr"] < 0.5 * peak for m in plain_lines if m["phase"] == "guidance")
    for m in guided:
        assert m["guide_rec_norm"] > 0 and m["guide_cls_norm"] > 0 and -1 <= m["guide_cos"] <= 1
        assert m["guide_shift_px"] > 0 and m["guide_color"] >= 0 and "guide_dloss_cls" in m


def test_an_lr_floor_keeps_the_late_phases_learning():
    import math

    from gvit.train import learning_rate, make_config

    plain, floored = make_config(steps=100, warmup=0.1), make_config(steps=100, warmup=0.1, lr_floor=0.25)
    peak = plain.base_lr * plain.batch_size / 256
    for step in (0, 10, 50, 99):
        cosine = 0.5 * (1 + math.cos(math.pi * max(0, step - 10) / 90))
        ramp = min(1.0, (step + 1) / 10)
        assert learning_rate(plain, step) == pytest.approx(peak * ramp * cosine)
        assert learning_rate(floored, step) == pytest.approx(peak * ramp * (0.25 + 0.75 * cosine))
    late = [learning_rate(floored, s) / peak for s in range(80, 100)]
    assert min(late) >= 0.25 and sum(late) / len(late) > 0.25
    with pytest.raises(ValueError, match="lr_floor"):
        make_config(lr_floor=1.5)


def test_object_share_by_hand():
    from gvit.explain import object_share

    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # the object: the top-left quarter
    means = torch.tensor([[[-0.75, -0.75], [0.75, 0.75], [-0.25, -0.25], [0.75, -0.75]]])  # on, off, on, off
    g = Gaussians(means, torch.full((1, 4, 2), 0.1), torch.zeros(1, 4), torch.rand(1, 4, 3),
                  torch.tensor([[0.6, 0.2, 0.3, 0.1]]), torch.tensor([[True, True, True, False]]))
    assert object_share(g, masks).tolist() == pytest.approx([(0.6 + 0.3) / (0.6 + 0.2 + 0.3)])  # the invalid one out


def test_a_guidance_phase_reports_what_it_did_and_keeps_it_in_the_checkpoint(tmp_path):
    from gvit.tools.report import training_report
    from gvit.train import load_checkpoint, load_trained, make_config, train

    cfg = make_config(data="shapes:64", limit_eval=16, encoder_size="micro", classifier_size="micro", image_size=16,
                      num_gaussians=16, batch_size=16, steps=12, guidance_from=0.5, guidance_every=1, lr_floor=0.5,
                      out=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    assert result["guidance_shift_px"] > 0 and 0 <= result["object_share_before_guidance"] <= 1
    assert result["fitted_guidance_shift_px"] > 0 and 0 <= result["fitted_object_share"] <= 1
    assert 0 <= result["object_share"] <= 1
    assert "encoder_before_guidance" in load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    again = load_trained(tmp_path / "run" / "checkpoint.pt").evaluate()
    assert again["guidance_shift_px"] == pytest.approx(result["guidance_shift_px"])
    summary = training_report(tmp_path / "run" / "checkpoint.pt", tmp_path / "report", num_examples=2)
    assert summary["guidance"]["encoder"]["shift_px"] == pytest.approx(result["guidance_shift_px"])
    assert summary["guidance"]["classifier_input"]["shift_px"] == pytest.approx(result["fitted_guidance_shift_px"])
    assert "guidance phase" in (tmp_path / "report" / "report.html").read_text()
    assert summary["guidance"]["lr_share"] == pytest.approx(result["guidance_lr_share"])
    assert result["guidance_lr_share"] > 0
    assert summary["files"]["guidance"] == "guidance.png" and (tmp_path / "report" / "guidance.png").stat().st_size
    none = train(make_config(**{**cfg.to_dict(), "guidance": False, "out": str(tmp_path / "none")}), progress=False)
    assert "guidance_shift_px" not in none


def test_phase_lr_gives_each_phase_its_own_warm_up_and_cosine():
    import math

    from gvit.train import learning_rate, make_config
    from gvit.train.gvit_step import GViTStep

    cfg = make_config(steps=100, warmup=0.1, lr_floor=0.2, classifier_from=0.3, pretrain_until=0.6,
                      guidance_from=0.8, guidance_every=2, phase_lr=True, classifier_lr_scale=0.5)
    assert cfg.schedule().boundaries(100) == [0, 30, 60, 100]  # the guidance phase continues the joint stage
    assert cfg.schedule().span(85, 100) == (60, 100)
    peak = cfg.base_lr * cfg.batch_size / 256

    def by_hand(step, first, end):  # warm-up over 10% of the phase, then cosine from the peak to 20% of it
        warm = int(0.1 * (end - first))
        ramp = min(1.0, (step - first + 1) / warm) if warm else 1.0
        t = max(0, step - first - warm) / max(1, end - first - warm)
        return peak * ramp * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t)))

    run = GViTStep(cfg, 6, torch.device("cpu"))
    for step, (first, end) in ((0, (0, 30)), (29, (0, 30)), (30, (30, 60)), (61, (60, 100)), (80, (60, 100)),
                               (99, (60, 100))):
        assert run.part_learning_rate("encoder", step) == pytest.approx(by_hand(step, first, end))
        classifier = 0.5 * by_hand(step, first, end) if step >= 30 else 0.0  # it trains from step 30
        assert run.part_learning_rate("classifier", step) == pytest.approx(classifier)
    assert learning_rate(cfg, 60, span=(60, 100)) < 0.3 * peak  # the stage's warm-up: restarts low ...
    assert run.part_learning_rate("encoder", 64) == pytest.approx(peak)  # ... and reaches the peak again
    guided = [s for s in range(80, 100) if cfg.schedule().at(s, 100).guidance]
    assert run.guidance_lr_share() == pytest.approx(sum(by_hand(s, 60, 100) for s in guided) / len(guided) / peak)
    assert 0.3 < run.guidance_lr_share() < 0.5
    one = GViTStep(make_config(**{**cfg.to_dict(), "phase_lr": False}), 6, torch.device("cpu"))
    assert one.part_learning_rate("encoder", 61) == pytest.approx(learning_rate(cfg, 61))  # one schedule
    assert one.guidance_lr_share() < 0.3


def test_a_joint_step_with_lambda_cls_0_leaves_the_classifier_alone():
    from gvit.train import make_config, step_generator
    from gvit.train.gvit_step import GViTStep

    cfg = make_config(steps=10, batch_size=4, image_size=16, encoder_size="micro", classifier_size="micro",
                      num_gaussians=16, classifier_from=0.0, guidance=False, lambda_cls=0.0)
    run = GViTStep(cfg, 6, torch.device("cpu"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    metrics = run.step(0, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), step_generator(0, 0), 0, 1)
    assert metrics["phase"] == "joint" and "loss_cls" in metrics  # measured, not trained on
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("classifier."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))


def _control_run(tmp_path, name, **changes):
    from gvit.train import make_config, train

    settings = dict(data="shapes:64", limit_eval=16, encoder_size="micro", classifier_size="micro", image_size=16,
                    num_gaussians=16, batch_size=16, steps=12, guidance_from=0.5, guidance_every=2, fit_steps=2,
                    gamma=0.5, lr_floor=0.5, out=str(tmp_path / name))
    cfg = make_config(**(settings | changes))
    return cfg, train(cfg, progress=False)


def test_the_guidance_control_differs_from_the_run_in_gamma_alone(tmp_path):
    """A gamma = 0 run with its control: the two take the same steps, so they end identical; the
    control leaves the run itself unchanged; with gamma > 0 the two part and the report says by how much."""
    from gvit.tools.report import training_report

    _, same = _control_run(tmp_path, "zero", gamma=0.0, guidance_control=True)
    assert same["guidance_vs_control_px"] == 0 and same["fitted_guidance_vs_control_px"] == 0
    assert same["control_top1"] == same["top1"] and same["control_loss"] == pytest.approx(same["loss"], abs=1e-6)
    assert same["control_shift_px"] == same["guidance_shift_px"] > 0
    assert same["object_share_control"] == same["object_share"]

    cfg, guided = _control_run(tmp_path, "guided", guidance_control=True)
    _, plain = _control_run(tmp_path, "plain")
    for key in ("top1", "loss", "psnr", "guidance_shift_px", "fitted_guidance_shift_px", "object_share"):
        assert guided[key] == plain[key], key  # the control draws no randomness of the run's
    assert "control_top1" not in plain and "control_shift_px" not in plain
    assert guided["guidance_vs_control_px"] > 0 and guided["fitted_guidance_vs_control_px"] > 0
    assert guided["control_shift_px"] != guided["guidance_shift_px"]

    summary = training_report(tmp_path / "guided" / "checkpoint.pt", tmp_path / "report", num_examples=2,
                              evaluation=guided)
    g = summary["guidance"]
    assert g["gamma"] == 0.5 and g["top1_minus_control"] == pytest.approx(guided["top1"] - guided["control_top1"])
    for view, prefix in (("encoder", ""), ("classifier_input", "fitted_")):
        assert g[view]["shift_px_minus_control"] == pytest.approx(
            guided[prefix + "guidance_shift_px"] - guided[prefix + "control_shift_px"])
        assert g[view]["object_share_minus_control"] == pytest.approx(
            guided[prefix + "object_share"] - guided[prefix + "object_share_control"])
    page = (tmp_path / "report" / "report.html").read_text()
    assert "gamma = 0 control" in page and "after test-time fitting" in page


def test_a_run_with_its_guidance_control_resumes_exactly(tmp_path):
    from gvit.train import load_checkpoint, train

    cfg, whole = _control_run(tmp_path, "whole", guidance_control=True)
    parted = cfg.to_dict() | {"out": str(tmp_path / "parted")}
    from gvit.train import make_config

    cut = make_config(**parted)
    train(cut, progress=False, stop_after=9)  # stopped inside the guidance phase (steps 6-11)
    assert "control" in load_checkpoint(tmp_path / "parted" / "checkpoint.pt")
    resumed = train(cut, resume=True, progress=False)
    for key in ("top1", "control_top1", "guidance_shift_px", "control_shift_px", "guidance_vs_control_px"):
        assert resumed[key] == whole[key], key


def test_guidance_control_needs_a_guidance_phase():
    from gvit.train import make_config

    with pytest.raises(ValueError, match="guidance_control"):
        make_config(guidance=False, guidance_control=True)
