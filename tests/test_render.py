import math

import numpy as np
import pytest
import torch

from gvit.gaussians import Gaussians
from gvit.render import cull_extent, rasterize, render
from reference import random_scene, reference_render

BACKENDS = ["cpu", "torch"]

# (B, k, C, H, W, scene options): non-square images, C = 1 and 5, Gaussians outside the image,
# tiny and huge scales, and dense opaque stacks that reach the 1e-4 stop.
SCENES = {
    "rgb-nonsquare": (2, 40, 3, 19, 27, {}),
    "gray": (2, 30, 1, 16, 16, {}),
    "features5": (1, 30, 5, 21, 13, {}),
    "tiny-huge": (2, 30, 3, 17, 23, {"log_scale": (math.log(1e-3), math.log(2.0))}),
    "outside": (2, 30, 3, 16, 20, {"spread": 2.5}),
    "opaque-stack": (2, 60, 3, 18, 18, {"opacity": (0.9, 1.0), "log_scale": (math.log(0.2), math.log(0.8))}),
}


def _p999(err):
    return np.quantile(err.abs().flatten().numpy(), 0.999)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("mode", ["alpha", "sum"])
def test_matches_float64_reference(backend, name, mode):
    n_img, k, n_ch, h, w, opts = SCENES[name]
    # float32 geometry cannot resolve sigma = 1e-3 (1/100 pixel) next to sigma = 2; the cpu backend
    # keeps geometry in float64 internally, the plain-float32 torch path is checked in float64 there
    dtype = torch.float64 if (backend == "torch" and name == "tiny-huge") else torch.float32
    scene = random_scene(n_img, k, n_ch, seed=list(SCENES).index(name), dtype=dtype, **opts)
    bg = torch.rand(n_ch, generator=torch.Generator().manual_seed(7), dtype=dtype)
    params = [t.clone().requires_grad_() for t in scene]
    bg_a = bg.clone().requires_grad_()
    out = rasterize(*params, height=h, width=w, background=bg_a, mode=mode, backend=backend)
    assert out.shape == (n_img, n_ch, h, w) and out.dtype == dtype

    ref_params = [t.double().requires_grad_() for t in scene]
    bg_r = bg.double().requires_grad_()
    ref = reference_render(*ref_params, h, w, background=bg_r, mode=mode)
    assert _p999(out.detach().double() - ref.detach()) < 1e-4

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = torch.autograd.grad((out * weights).sum(), params + [bg_a])
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_params + [bg_r])
    for label, g, gr in zip(["means", "scales", "angles", "colors", "opacities", "background"], grads, ref_grads):
        assert _rel(g, gr) < 1e-2, f"{label}: relative gradient error {_rel(g, gr):.2e}"


def test_stop_rule_is_exercised_and_exact():
    """The opaque stack must contain pixels that stop early, and those pixels must match."""
    n_img, k, n_ch, h, w, opts = SCENES["opaque-stack"]
    scene = random_scene(n_img, k, n_ch, seed=list(SCENES).index("opaque-stack"), **opts)
    with torch.no_grad():
        # background 1 => the output minus the coloured part reveals T_end; T_end <= 1e-4 means
        # a Gaussian was refused by the stop rule (the full product would fall further).
        out = rasterize(*scene, height=h, width=w, background=torch.ones(n_ch), backend="cpu")
        colour_only = rasterize(*scene, height=h, width=w, backend="cpu")
    t_end = (out - colour_only)[:, 0]
    assert (t_end < 1e-3).float().mean() > 0.2
    ref = reference_render(*scene, h, w)
    assert (colour_only.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["alpha", "sum"])
def test_gradcheck(backend, mode):
    scene = random_scene(2, 5, 2, seed=3, spread=0.8, log_scale=(math.log(0.15), math.log(0.4)),
                         opacity=(0.3, 0.9), dtype=torch.float64)
    params = [t.requires_grad_() for t in scene]
    bg = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def f(*args):
        return rasterize(*args[:5], height=7, width=9, background=args[5], mode=mode, backend=backend)

    assert torch.autograd.gradcheck(f, (*params, bg), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_cpu_and_torch_backends_agree_at_larger_size():
    scene = random_scene(3, 200, 3, seed=11, log_scale=(math.log(1 / 64), math.log(1 / 8)), opacity=(0.2, 1.0))
    a = rasterize(*scene, height=48, width=64, backend="cpu")
    b = rasterize(*scene, height=48, width=64, backend="torch")
    assert _p999(a - b) < 1e-5


@pytest.mark.parametrize("tile", [1, 3, 8, 16, 64])
def test_tile_size_does_not_change_result(tile):
    scene = random_scene(2, 50, 3, seed=5)
    base = rasterize(*scene, height=20, width=30, backend="torch")
    out = rasterize(*scene, height=20, width=30, backend="cpu", tile_size=tile)
    assert (out - base).abs().max() < 1e-5


def test_culling_radius_is_exact():
    """Pixels just outside a Gaussian's cull box have alpha < 1/255; just inside, >= 1/255."""
    scales = torch.tensor([[[0.3, 0.1]]], dtype=torch.float64)
    angles = torch.tensor([[0.7]], dtype=torch.float64)
    opac = torch.tensor([[0.6]], dtype=torch.float64)
    ex = cull_extent(scales, angles, opac)[0, 0]
    cov_xx = (math.cos(0.7) * 0.3) ** 2 + (math.sin(0.7) * 0.1) ** 2
    assert math.isclose(ex[0].item(), math.sqrt(2 * math.log(255 * 0.6) * cov_xx), rel_tol=1e-12)
    # the largest alpha over a whole column at x offset d is o * exp(-d^2 / (2 Sigma_xx)), so the
    # column just inside the extent is visible somewhere and the one just outside nowhere
    for d, visible in ((ex[0].item() * 0.999, True), (ex[0].item() * 1.001, False)):
        alpha = 0.6 * math.exp(-d * d / (2 * cov_xx))
        assert (alpha >= 1 / 255) == visible
    assert cull_extent(scales, angles, torch.tensor([[1 / 300]], dtype=torch.float64)).abs().max() == 0


def test_batch_elements_are_independent():
    scene = random_scene(4, 30, 3, seed=8)
    full = rasterize(*scene, height=16, width=16)
    for b in range(4):
        one = rasterize(*[t[b:b + 1] for t in scene], height=16, width=16)
        assert torch.equal(one[0], full[b])


def test_background_shapes_and_default():
    scene = random_scene(2, 10, 3, seed=9)
    zero = rasterize(*scene, height=8, width=8)
    per_image = torch.tensor([[0.0, 0, 0], [0, 0, 0]])
    assert torch.equal(zero, rasterize(*scene, height=8, width=8, background=per_image))
    bg = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 0.5]])
    out = rasterize(*scene, height=8, width=8, background=bg)
    ref = reference_render(*scene, 8, 8, background=bg)
    assert (out.double() - ref).abs().max() < 1e-5


def test_empty_scene_renders_background():
    scene = random_scene(1, 3, 3, seed=1)
    scene[4] = torch.zeros(1, 3)  # invisible Gaussians
    out = rasterize(*scene, height=5, width=6, background=torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(out, torch.tensor([0.1, 0.2, 0.3])[None, :, None, None].expand(1, 3, 5, 6))


def test_half_precision_input_returns_half():
    scene = [t.half() for t in random_scene(1, 10, 3, seed=2)]
    out = rasterize(*scene, height=8, width=8)
    assert out.dtype == torch.float16
    ref = reference_render(*scene, 8, 8)
    assert (out.double() - ref).abs().max() < 5e-3


def test_render_skips_invalid_slots():
    means, scales, angles, colors, opac = random_scene(1, 6, 3, seed=4, spread=0.5)
    valid = torch.tensor([[True, False, True, False, True, True]])
    g = Gaussians(means, scales, angles, colors, opac, valid=valid)
    keep = valid[0]
    expected = rasterize(means[:, keep], scales[:, keep], angles[:, keep], colors[:, keep], opac[:, keep],
                         height=10, width=10)
    assert torch.allclose(render(g, height=10, width=10), expected, atol=1e-6)


def _good(n_img=2, k=4, n_ch=3):
    return dict(zip(["means", "scales", "angles", "colors", "opacities"], random_scene(n_img, k, n_ch, seed=0)))


@pytest.mark.parametrize(
    "name, bad",
    [
        ("means", torch.zeros(2, 4, 3)),
        ("means", torch.zeros(2, 4, 2, dtype=torch.int64)),
        ("scales", torch.ones(2, 5, 2)),
        ("scales", -torch.ones(2, 4, 2)),
        ("scales", torch.zeros(2, 4, 2)),
        ("angles", torch.zeros(2, 4, 1)),
        ("colors", torch.zeros(2, 4, 0)),
        ("colors", torch.zeros(3, 4, 3)),
        ("opacities", torch.full((2, 4), 1.5)),
        ("opacities", torch.zeros(2, 4, dtype=torch.float64)),
        ("means", torch.full((2, 4, 2), float("nan"))),
        ("colors", torch.full((2, 4, 3), float("inf"))),
    ],
)
def test_bad_tensor_raises_naming_argument(name, bad):
    args = _good()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        rasterize(**args, height=8, width=8)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(height=0, width=8), "height"),
        (dict(height=8, width=2.5), "width"),
        (dict(height=8, width=8, mode="max"), "mode"),
        (dict(height=8, width=8, backend="opengl"), "backend"),
        (dict(height=8, width=8, background=torch.zeros(4)), "background"),
        (dict(height=8, width=8, background=torch.full((3,), float("nan"))), "background"),
        (dict(height=8, width=8, backend="gsplat"), "gsplat"),
    ],
)
def test_bad_options_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        rasterize(**_good(), **kwargs)


def test_tile_lists_hold_exactly_the_touching_gaussians_in_order():
    """Binning: per tile, in index order, every Gaussian visible in the tile and none that is culled."""
    from gvit.render import _cpu_kernels as K
    from gvit.gaussians import conic

    means, scales, angles, colors, opac = random_scene(3, 80, 3, seed=12, spread=1.6)
    opac[:, ::3] = 0.0  # never visible
    h, w, tile = 23, 37, 8
    n_tx, n_ty = -(-w // tile), -(-h // tile)
    ext = cull_extent(scales.double(), angles.double(), opac.double()).numpy()
    params = np.concatenate([means.double().numpy(), conic(scales.double(), angles.double()).numpy(),
                             opac.double().numpy()[..., None], np.zeros((3, 80, 1))], -1)
    offsets, ids = K.bin_gaussians(params, ext, h, w, tile, n_tx, n_ty)
    ys = (2 * np.arange(h) + 1) / h - 1
    xs = (2 * np.arange(w) + 1) / w - 1
    for b in range(3):
        for t in range(n_tx * n_ty):
            lst = ids[offsets[b * n_tx * n_ty + t]:offsets[b * n_tx * n_ty + t + 1]]
            assert np.all(np.diff(lst) > 0)
            assert not np.any(lst % 3 == 0)
            ty, tx = divmod(t, n_tx)
            yy, xx = np.meshgrid(ys[ty * tile:(ty + 1) * tile], xs[tx * tile:(tx + 1) * tile], indexing="ij")
            for g in range(80):
                m, (a, bb, c), o = params[b, g, :2], params[b, g, 2:5], params[b, g, 5]
                dx, dy = xx - m[0], yy - m[1]
                alpha = o * np.exp(-0.5 * (a * dx * dx + c * dy * dy) - bb * dx * dy)
                if (alpha >= 1 / 255).any():
                    assert g in lst, (b, t, g)


def test_cpu_kernels_exp_matches_libm_on_its_range():
    """The kernels' vectorisable exp (a polynomial, squared four times) against numpy's, on the
    exponents the kernels evaluate (ln(1/255) and above; opacity <= 1)."""
    import sys

    import numba

    kernels = sys.modules["gvit.render._cpu_kernels"]
    exp = numba.njit(lambda x: kernels._exp(x))
    xs = np.concatenate([np.linspace(math.log(1 / 255) - 1e-3, 0.0, 20001), [-1e-300, 0.0]])
    got = np.array([exp(x) for x in xs])
    assert np.abs(got / np.exp(xs) - 1).max() < 1e-14
