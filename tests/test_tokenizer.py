"""The vector quantiser and the GaussianToken / plain VQ tokenizer (gvit.models.quantizer, .tokenizer)."""

import math

import pytest
import torch

from gvit.gaussians import grid_centres
from gvit.models.quantizer import VectorQuantizer, code_statistics, kmeans, rotate_to
from gvit.models.query_head import DeformableCrossAttention
from gvit.models.tokenizer import SCALE_MAX, SCALE_MIN, TOKENIZER_KINDS, make_tokenizer

from reference import reference_render


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found, counts = kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    order = [int(torch.cdist(c[None], found).argmin()) for c in centres]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(found[order], centres, atol=0.1) and counts.sum() == 150


def test_nearest_code_is_the_brute_force_argmin():
    vq = VectorQuantizer(16, 3)
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    brute = ((x[..., None, :] - vq.codebook.double()) ** 2).sum(-1).argmin(-1)
    assert torch.equal(vq.nearest(x), brute)
    vq.eval()
    out = vq(x.float())
    assert torch.equal(out.indices, brute) and torch.equal(out.values, vq.codebook[brute])


def test_ema_update_on_a_toy_batch():
    vq = VectorQuantizer(2, 1, decay=0.5, eps=0.0, dead_below=0.0)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.ema_count.copy_(torch.tensor([1.0, 1.0]))
    vq.ema_sum.copy_(torch.tensor([[0.0], [10.0]]))
    vq.initialised.fill_(True)
    vq(torch.tensor([[1.0], [2.0], [9.0]]))
    # counts 0.5 * 1 + 0.5 * (2, 1) = (1.5, 1); sums 0.5 * (0, 10) + 0.5 * (3, 9) = (1.5, 9.5)
    assert torch.allclose(vq.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.codebook, torch.tensor([[1.0], [9.5]]))


def test_first_training_batch_initialises_by_kmeans_and_dead_codes_are_reseeded():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.99, dead_below=2.0)
    batch = torch.cat([torch.full((20, 2), 3.0), torch.full((20, 2), -3.0)]) + 0.01 * torch.randn(40, 2)
    vq(batch, torch.Generator().manual_seed(0))
    assert bool(vq.initialised)
    # every code now sits on a batch vector (k-means centres or re-seeds), none far from the data
    assert torch.cdist(vq.codebook, batch).min(-1).values.max() < 0.5
    # a code nobody uses decays below the threshold and is re-seeded from the batch
    vq.codebook[3] = torch.tensor([100.0, 100.0])
    vq.ema_count[3] = 2.5
    vq.ema_sum[3] = vq.codebook[3] * 2.5
    for _ in range(30):
        vq(batch, torch.Generator().manual_seed(1))
    assert torch.cdist(vq.codebook[3:], batch).min() < 0.5 and vq.ema_count[3] >= 2.0


def _rotation_matrix(e, q):
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(len(e), dtype=e.dtype)
    return (q.norm() / e.norm()) * (eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat))


def test_rotation_trick_gives_the_code_and_a_rotated_gradient():
    torch.manual_seed(0)
    e = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 5, dtype=torch.float64)
    out = rotate_to(e, q)
    assert torch.allclose(out, q, atol=1e-12)
    w = torch.randn(4, 5, dtype=torch.float64)
    (out * w).sum().backward()
    for i in range(4):
        m = _rotation_matrix(e[i].detach(), q[i])
        assert torch.allclose(m @ e[i].detach(), q[i], atol=1e-10)
        assert torch.allclose(e.grad[i], m.T @ w[i], atol=1e-10)


@pytest.mark.parametrize("gradient", ["rotation", "straight_through"])
def test_gradient_reaches_the_encoder_and_commitment_pulls_toward_the_code(gradient):
    vq = VectorQuantizer(8, 3, gradient=gradient).eval()
    x = torch.randn(6, 3, requires_grad=True)
    out = vq(x)
    (out.values.sum() + out.commitment).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if gradient == "straight_through":
        expected = 1 + 0.25 * 2 * (x - vq.codebook[out.indices]).detach() / x.numel()
        assert torch.allclose(x.grad, expected, atol=1e-6)


def test_usage_and_perplexity_of_a_known_histogram():
    stats = code_statistics(torch.tensor([0, 0, 1, 1]), 4)
    assert stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(2.0)
    stats = code_statistics(torch.arange(8), 8)
    assert stats["usage"] == 1.0 and stats["perplexity"] == pytest.approx(8.0)
    stats = code_statistics(torch.tensor([3, 3, 3]), 8)
    assert stats["perplexity"] == pytest.approx(1.0)


def test_splatting_matches_a_dense_float64_sum():
    model = make_tokenizer("gaussian", image_size=16, num_tokens=9, num_codes=8, z=4)
    g = torch.Generator().manual_seed(0)
    means = torch.rand(2, 9, 2, generator=g) * 2 - 1
    scales = 0.05 + 0.3 * torch.rand(2, 9, 2, generator=g)
    angles = torch.rand(2, 9, generator=g) * math.pi
    codes = torch.randn(2, 9, 4, generator=g)
    out = model.zmap(codes, means, scales, angles)
    ref = reference_render(means.double(), scales.double(), angles.double(), codes.double(),
                           torch.ones(2, 9, dtype=torch.float64), 8, 8, mode="sum")
    assert out.shape == (2, 4, 8, 8) and torch.allclose(out.double(), ref, atol=1e-5)


def _bilinear(value, x, y):
    """Zero-padded bilinear sample of ``value [C, h, w]`` at normalised (x, y), pixel centres at
    (2j + 1) / w - 1, one pixel at a time."""
    c, h, w = value.shape
    px, py = ((x + 1) * w - 1) / 2, ((y + 1) * h - 1) / 2
    j0, i0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=value.dtype)
    for i, wy in ((i0, 1 - (py - i0)), (i0 + 1, py - i0)):
        for j, wx in ((j0, 1 - (px - j0)), (j0 + 1, px - j0)):
            if 0 <= i < h and 0 <= j < w:
                out += wx * wy * value[:, i, j]
    return out


def test_deformable_cross_attention_matches_point_by_point_sampling_in_float64():
    torch.manual_seed(0)
    b, k, d, heads, points, h, w = 2, 3, 8, 2, 3, 5, 6
    attn = DeformableCrossAttention(d, heads, points).double()
    torch.nn.init.normal_(attn.offsets.weight, std=0.5)  # offsets and weights that depend on the query
    torch.nn.init.normal_(attn.weights.weight, std=0.5)
    x, fmap = torch.randn(b, k, d, dtype=torch.float64), torch.randn(b, d, h, w, dtype=torch.float64)
    reference = torch.rand(b, k, 2, dtype=torch.float64) * 2.4 - 1.2  # some samples fall off the map
    with torch.no_grad():
        value = attn.value(fmap)
        offsets = attn.offsets(x).view(b, k, heads, points, 2)
        weights = attn.weights(x).view(b, k, heads, points).softmax(-1)
        actual = attn(x, reference, fmap)
    dh = d // heads
    expected = torch.zeros(b, k, d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(k):
            for hi in range(heads):
                for p in range(points):
                    sx = reference[bi, qi, 0] + offsets[bi, qi, hi, p, 0] * 2 / w  # offsets in map pixels
                    sy = reference[bi, qi, 1] + offsets[bi, qi, hi, p, 1] * 2 / h
                    sample = _bilinear(value[bi, hi * dh:(hi + 1) * dh], float(sx), float(sy))
                    expected[bi, qi, hi * dh:(hi + 1) * dh] += weights[bi, qi, hi, p] * sample
    with torch.no_grad():
        torch.testing.assert_close(actual, attn.proj(expected))


def test_gaussian_tokens_start_on_the_grid_with_half_cell_scales():
    model = make_tokenizer("gaussian", image_size=16, num_tokens=16, num_codes=8, channels=8, width=16, heads=2)
    unit = torch.sigmoid(model.head.anchors[:, 3:5])
    torch.testing.assert_close(SCALE_MIN + (SCALE_MAX - SCALE_MIN) * unit, torch.full((16, 2), 1.0))  # 8/4/2 px
    torch.testing.assert_close(model.head.refine[0].fc2.bias[3:5], model.head.anchors[0, 3:5])


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_every_kind_trains_and_decoding_its_tokens_equals_the_forward_pass(kind):
    torch.manual_seed(0)
    model = make_tokenizer(kind, image_size=16, num_tokens=16, num_codes=32, channels=16, width=32, heads=2,
                      feature_dim=16, stages=2)
    images = torch.rand(3, 3, 16, 16)
    out = model(images, torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == (3, 3, 16, 16) and out.indices.shape == (3, 16)
    ((out.reconstruction - images).abs().mean() + out.commitment).backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # through the quantiser to the encoder
    model.eval()
    with torch.no_grad():
        out = model(images)
        decoded = model.decode(out.indices, out.means, out.scales, out.angles)
    assert torch.allclose(decoded, out.reconstruction, atol=1e-5)
    if kind == "gaussian_fixed":
        assert torch.equal(out.means[0], out.means[1]) and torch.equal(out.angles, torch.zeros_like(out.angles))
    if kind == "gaussian_bits":  # every geometry value on one of 2^4 levels of its range
        unit = (out.means + 1) / 2
        assert torch.allclose(unit * 15, (unit * 15).round(), atol=1e-4)


def test_plain_vq_reads_with_the_same_query_head_as_gaussian_tokens_on_fixed_grid_centres():
    kw = dict(image_size=16, num_tokens=16, num_codes=8, channels=8, width=16, heads=2, feature_dim=16, stages=2)
    a, b, conv = make_tokenizer("vq", **kw), make_tokenizer("gaussian", **kw), make_tokenizer("vq_conv", **kw)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(a.head) == count(b.head) and count(a.to_code) == count(b.to_code)  # the same token head
    assert count(a) == count(b) and count(conv) < count(a) // 2  # vq_conv: one strided convolution instead
    torch.nn.init.normal_(a.head.refine[0].fc2.weight)  # refinements that would move free centres
    geometry, _ = a.head(a.encoder(torch.rand(2, 3, 16, 16)))
    centres = torch.tanh(geometry[..., :2] / 2)
    torch.testing.assert_close(centres, grid_centres(16).expand(2, -1, -1), atol=2e-3, rtol=0)  # row-major grid
    assert not {"head", "to_code"} & {name.split(".")[0] for name, _ in conv.named_parameters()}


def test_bits_per_image():
    assert make_tokenizer("vq", num_codes=1024).bits_per_image() == 640
    assert make_tokenizer("gaussian_fixed", num_codes=1024).bits_per_image() == 640
    assert make_tokenizer("gaussian", num_codes=1024).bits_per_image() == 640 + 64 * 5 * 32
    assert make_tokenizer("gaussian_bits", num_codes=1024, geometry_bits=4).bits_per_image() == 640 + 64 * 20


def test_codebook_state_round_trips():
    a = make_tokenizer("vq", image_size=16, num_tokens=16, num_codes=8, channels=16)
    a(torch.rand(4, 3, 16, 16))
    b = make_tokenizer("vq", image_size=16, num_tokens=16, num_codes=8, channels=16)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.quantizer.codebook, b.quantizer.codebook) and bool(b.quantizer.initialised)


@pytest.mark.parametrize("make, match", [
    (lambda: make_tokenizer("patches"), "kind"),
    (lambda: make_tokenizer("vq", num_tokens=60), "square grid"),
    (lambda: make_tokenizer("gaussian", geometry_bits=0), "geometry_bits"),
    (lambda: VectorQuantizer(8, 3, gradient="magic"), "gradient"),
    (lambda: make_tokenizer("gaussian", image_size=16)(torch.rand(1, 3, 32, 32)), "expected"),
    (lambda: make_tokenizer("vq", image_size=16, num_tokens=16).decode(torch.full((1, 16), 5000)), "indices"),
    (lambda: make_tokenizer("gaussian", image_size=16, num_tokens=16).decode(torch.zeros(1, 16, dtype=torch.long)),
     "geometry"),
    (lambda: VectorQuantizer(8, 3)(torch.rand(4, 2)), "3 values"),
])
def test_bad_inputs_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()
