import math

import pytest
import torch
from torch import nn

from gvit.gaussians import decode

from gvit.models import Attention, GaussianClassifier, GaussianEncoder, PatchViT, sample_footprints


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


def test_transformer_last_tokens_equal_the_full_computation():
    # the encoder keeps only its k Gaussian latents: computing just those in the last block
    # must give the same values (and gradients) as the full sequence sliced afterwards
    from gvit.models import Transformer, ViTSize

    torch.manual_seed(0)
    net = Transformer(ViTSize(16, 3, 4)).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])
    full = net(x, mask)[:, -3:]
    part = net(x, mask, last=3)
    assert part.shape == (2, 3, 16)
    assert torch.allclose(part, full, atol=1e-12)
    w = torch.randn_like(full)
    (g_full,) = torch.autograd.grad((full * w).sum(), x)
    (g_part,) = torch.autograd.grad((part * w).sum(), x)
    assert torch.allclose(g_part, g_full, atol=1e-12)
    assert not torch.allclose(net(x, mask, last=3), net(x[:, 1:], mask[:, 1:], last=3))  # all tokens are read


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


def _bilinear_reference(image, x, y):
    """Dense float64 bilinear sample of ``image [C, H, W]`` at normalised (x, y), edges clamped."""
    c, h, w = image.shape
    col, row = (x + 1) * w / 2 - 0.5, (y + 1) * h / 2 - 0.5
    col, row = min(max(col, 0.0), w - 1.0), min(max(row, 0.0), h - 1.0)
    c0, r0 = int(math.floor(col)), int(math.floor(row))
    c1, r1 = min(c0 + 1, w - 1), min(r0 + 1, h - 1)
    fc, fr = col - c0, row - r0
    top = image[:, r0, c0] * (1 - fc) + image[:, r0, c1] * fc
    bottom = image[:, r1, c0] * (1 - fc) + image[:, r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def test_sample_footprints_matches_a_dense_bilinear_reference():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 10, 14, generator=gen, dtype=torch.float64)
    g0 = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    g0[0, 0, :2] = 4.0  # a centre at the corner: stencil points outside the image are clamped
    out = sample_footprints(images, g0, scale_factor=0.5)
    assert out.shape == (2, 5, 27)
    g = decode(g0, 0.5)
    for b in range(2):
        for i in range(5):
            mx, my = g.means[b, i].tolist()
            sx, sy = g.scales[b, i].tolist()
            phi = float(g.angles[b, i])
            for n, (v, u) in enumerate([(v, u) for v in (-1, 0, 1) for u in (-1, 0, 1)]):
                x = mx + math.cos(phi) * u * sx - math.sin(phi) * v * sy
                y = my + math.sin(phi) * u * sx + math.cos(phi) * v * sy
                ref = _bilinear_reference(images[b], x, y)
                assert torch.allclose(out[b, i, 3 * n:3 * n + 3], ref, atol=1e-10), (b, i, n)
    # the centre sample of a Gaussian sitting on a pixel centre is that pixel
    g0c = torch.zeros(1, 1, 9, dtype=torch.float64)
    g0c[0, 0, 0], g0c[0, 0, 1] = math.atanh((2 * 3 + 1) / 14 - 1), math.atanh((2 * 6 + 1) / 10 - 1)
    assert torch.allclose(sample_footprints(images[:1], g0c)[0, 0, 12:15], images[0, :, 6, 3])


def test_encoder_with_image_footprints():
    torch.manual_seed(0)
    enc = GaussianEncoder(16, 8, 8, "micro", sample_image=True, scale_factor=0.5)
    images, g0 = torch.rand(2, 3, 16, 16), torch.randn(2, 8, 9)
    assert torch.equal(enc(images, g0), g0)  # still starts at g0
    nn.init.normal_(enc.head.fc2.weight, std=0.1)
    out = enc(images, g0)
    enc.patch_embed.proj.weight.data.zero_()  # the patches carry nothing: only the footprints see the image
    out = enc(images, g0)
    assert not torch.allclose(out, enc(images.flip(-1), g0))
    out.sum().backward()
    assert enc.footprint_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned_queries"):
        GaussianEncoder(16, 4, 8, "micro", learned_queries=True, sample_image=True)


def test_encoder_with_image_colours_starts_at_the_recoloured_g0():
    torch.manual_seed(0)
    enc = GaussianEncoder(16, 8, 6, "micro", image_colors=True, scale_factor=0.5)
    images, g0 = torch.rand(2, 3, 16, 16), torch.randn(2, 6, 9)
    out = enc(images, g0)
    centre = sample_footprints(images, g0, 0.5).view(2, 6, 9, 3)[:, :, 4]  # colour at each g0 mean
    assert torch.equal(out[..., :5], g0[..., :5]) and torch.equal(out[..., 8:], g0[..., 8:])
    assert torch.allclose(torch.sigmoid(out[..., 5:8]), centre.clamp(1e-3, 1 - 1e-3), atol=1e-6)
    assert not torch.allclose(out, enc(images.flip(-1), g0))
    with pytest.raises(ValueError, match="learned_queries"):
        GaussianEncoder(16, 4, 8, "micro", learned_queries=True, image_colors=True)


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


def test_drop_path_drops_whole_samples_unbiased_and_only_in_training():
    from gvit.models.layers import DropPath, set_drop_path_generator

    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    set_drop_path_generator([drop], torch.Generator().manual_seed(0))
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # a sample's branch is kept or dropped whole
    assert torch.allclose(per_sample[:, 0].unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.03
    assert abs(float(y.mean()) - 1.0) < 0.04  # kept samples scaled by 1 / (1 - rate)
    set_drop_path_generator([drop], torch.Generator().manual_seed(0))
    assert torch.equal(drop(x), y)  # the same generator state draws the same samples
    drop.eval()
    assert torch.equal(drop(x), x)
    with pytest.raises(ValueError, match="drop_path"):
        DropPath(1.0)


def test_classifier_with_drop_path_keeps_its_weights_and_eval_output():
    torch.manual_seed(0)
    plain = PatchViT(16, 4, 5, "micro")
    dropped = PatchViT(16, 4, 5, "micro", drop_path=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    images = torch.rand(6, 3, 16, 16)
    plain.eval(), dropped.eval()
    assert torch.allclose(plain(images), dropped(images))
    rates = [getattr(b.drop_path, "rate", 0.0) for b in dropped.transformer.blocks]
    assert rates == [0.0, 0.5]  # rising linearly to the last block's rate
    dropped.train()
    outs = torch.stack([dropped(images) for _ in range(8)])
    assert not torch.allclose(outs[0], outs[1:])  # in training, residual branches come and go
