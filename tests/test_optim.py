"""apply_gradients and the AdamW it steps, against torch's single-tensor AdamW and clip_grad_norm_."""

import copy
from types import SimpleNamespace

import pytest
import torch

from gvit.train.optim import adamw, apply_gradients, gradient_norm, param_groups

CFG = SimpleNamespace(weight_decay=0.05, base_lr=1e-2, beta1=0.9, beta2=0.95)


def model_and_loss(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    x = torch.randn(16, 5)
    return model, lambda m: (m(x) ** 2).mean() * 50  # large enough that clipping at 0.1 acts


def test_gradient_norm_matches_float64():
    model, loss = model_and_loss()
    loss(model).backward()
    dense = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    assert float(gradient_norm(model.parameters())) == pytest.approx(float(dense), rel=1e-6)


@pytest.mark.parametrize("clip", [None, 0.1])
def test_steps_match_reference_adamw(clip):
    model, loss = model_and_loss()
    ref = copy.deepcopy(model)
    opt = adamw(CFG, model)
    assert opt.defaults["fused"] or opt.defaults["foreach"]  # not the per-parameter loop
    ref_opt = torch.optim.AdamW(param_groups(ref, CFG.weight_decay), lr=CFG.base_lr, betas=(0.9, 0.95),
                                foreach=False, fused=False)
    for _ in range(5):
        assert apply_gradients([(model, opt)], loss(model), grad_clip=clip)
        ref_opt.zero_grad()
        loss(ref).backward()
        if clip:
            assert float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)) > clip  # clipping acted
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(bad):
    model, loss = model_and_loss()
    before = copy.deepcopy(model.state_dict())
    opt = adamw(CFG, model)
    loss(model).backward()
    next(model.parameters()).grad[0, 0] = bad
    assert not apply_gradients([(model, opt)], None, grad_clip=1.0)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not apply_gradients([(model, opt)], loss(model) * bad, grad_clip=None)  # a non-finite loss too
