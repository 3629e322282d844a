import math

import pytest
import torch

from gvit.models import Attention, GaussianClassifier, GaussianEncoder, PatchViT


def test_vit_s16_and_b16_have_the_standard_parameter_counts():
    # ViT-S/16 and ViT-B/16 at 224x224 with 1000 classes: 22,050,664 and 86,567,656 parameters
    assert sum(p.numel() for p in PatchViT(224, 16, 1000, "S").parameters()) == 22_050_664
    assert sum(p.numel() for p in PatchViT(224, 16, 1000, "B").parameters()) == 86_567_656


def test_attention_matches_a_float64_softmax_reference_with_a_padding_mask():
    torch.manual_seed(0)
    attn = Attention(16, 4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    out = attn(x, mask)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_ignores_invalid_slots(pool):
    torch.manual_seed(0)
    model = GaussianClassifier(6, 3, "micro", pool=pool).eval()
    g = torch.randn(2, 6, 9)
    valid = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    other = g.clone()
    other[0, 3:] = torch.randn(3, 9) * 10
    assert torch.allclose(model(g, valid), model(other, valid), atol=1e-6)
    assert not torch.allclose(model(g), model(other))
    with pytest.raises(ValueError, match="gaussians"):
        model(torch.randn(2, 5, 9))


def test_encoder_starts_at_g0_and_learns_a_residual():
    torch.manual_seed(0)
    enc = GaussianEncoder(16, 4, 8, "micro")
    images, g0 = torch.rand(2, 3, 16, 16), torch.randn(2, 8, 9)
    assert torch.equal(enc(images, g0), g0)
    enc(images, g0).square().sum().backward()
    assert enc.head.fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="g0"):
        enc(images, torch.randn(2, 7, 9))
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(2, 3, 12, 16), g0)


def test_learned_queries_and_patch_vit_shapes_and_gradients():
    torch.manual_seed(0)
    enc = GaussianEncoder(16, 4, 8, "micro", learned_queries=True)
    out = enc(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 8, 9)
    vit = PatchViT(16, 4, 5, "micro", pool="mean")
    logits = vit(torch.rand(3, 3, 16, 16))
    assert logits.shape == (3, 5)
    (out.sum() + logits.sum()).backward()
    for model in (enc, vit):
        assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="divisible"):
        PatchViT(15, 4, 2, "micro")
    with pytest.raises(ValueError, match="size"):
        PatchViT(16, 4, 2, "huge")
