import math

import pytest
import torch

from gvit.gaussians import (RAW_DIM, conic, covariance, decode, det_covariance, encode,
                            load_gaussians, sample_initial, save_gaussians)


def _raw(b=3, k=7, seed=0):
    return torch.randn(b, k, RAW_DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_decode_follows_the_paper():
    raw = _raw()
    g = decode(raw, scale_factor=0.75)
    assert torch.allclose(g.means, torch.tanh(raw[..., :2]))
    assert torch.allclose(g.scales, 0.75 * torch.sigmoid(raw[..., 2:4]))
    assert torch.equal(g.angles, raw[..., 4])
    assert torch.allclose(g.colors, torch.sigmoid(raw[..., 5:8]))
    assert torch.allclose(g.opacities, torch.sigmoid(raw[..., 8]))
    assert g.means.abs().max() < 1 and (g.scales > 0).all() and (g.scales < 0.75).all()


def test_decode_is_differentiable_and_encode_inverts_it():
    raw = _raw().requires_grad_()
    g = decode(raw, scale_factor=2.0)
    (g.means.sum() + g.scales.sum() + g.angles.sum() + g.colors.sum() + g.opacities.sum()).backward()
    assert raw.grad is not None and (raw.grad != 0).all()
    back = encode(decode(raw.detach(), 2.0), 2.0)
    assert torch.allclose(back, raw.detach(), atol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8), torch.zeros(9)])
def test_decode_rejects_wrong_layout(bad):
    with pytest.raises(ValueError, match="raw"):
        decode(bad)


def test_covariance_conic_det_agree_with_linear_algebra():
    scales = torch.exp(torch.empty(4, 9, 2, dtype=torch.float64).uniform_(-5, 0))
    angles = torch.empty(4, 9, dtype=torch.float64).uniform_(-4, 4)
    cov = covariance(scales, angles)
    assert torch.allclose(cov, cov.transpose(-1, -2))
    a, b, c = conic(scales, angles).unbind(-1)
    inv = torch.stack([torch.stack([a, b], -1), torch.stack([b, c], -1)], -2)
    eye = torch.eye(2, dtype=torch.float64).expand_as(cov)
    assert torch.allclose(inv @ cov, eye, atol=1e-9)
    assert torch.allclose(det_covariance(scales), torch.linalg.det(cov), rtol=1e-9)
    # the local x-axis turned by phi toward +y is the eigenvector with variance sx^2
    axis = torch.stack([torch.cos(angles), torch.sin(angles)], -1)[..., None]
    assert torch.allclose(cov @ axis, scales[..., :1, None] ** 2 * axis, atol=1e-12)


def test_sample_initial_shapes_ranges_and_determinism():
    g0 = sample_initial(5, 64, generator=torch.Generator().manual_seed(1))
    assert g0.shape == (5, 64, RAW_DIM) and torch.isfinite(g0).all()
    again = sample_initial(5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g0, again)
    d = decode(g0)
    assert d.means.abs().max() <= 0.95 + 1e-6
    assert d.means.std() > 0.4  # spread over the image, not clustered at the centre
    with pytest.raises(ValueError):
        sample_initial(2, 0)


@pytest.mark.parametrize("k", [64, 50, 7, 1])
def test_sample_initial_stratified_puts_one_mean_per_cell(k):
    g0 = sample_initial(3, k, layout="stratified", generator=torch.Generator().manual_seed(2))
    rows = int(k ** 0.5)
    cols = -(-k // rows)
    means = decode(g0.double()).means / 0.95  # back to [-1, 1]
    cell = ((means[..., 1] + 1) / 2 * rows).floor() * cols + ((means[..., 0] + 1) / 2 * cols).floor()
    for b in range(3):  # k distinct cells of the rows x cols grid
        assert len(cell[b].unique()) == k and cell[b].min() >= 0 and cell[b].max() < rows * cols
    assert k == 1 or not torch.equal(cell[0], cell[1])  # the cells and the slot order are random per set
    grid = sample_initial(3, k, layout="grid", generator=torch.Generator().manual_seed(2))
    means = decode(grid.double()).means / 0.95
    cell_g = ((means[..., 1] + 1) / 2 * rows).floor() * cols + ((means[..., 0] + 1) / 2 * cols).floor()
    assert (cell_g.diff(dim=1) > 0).all()  # the same draw, slots in row-major cell order
    assert torch.equal(cell_g.sort(1).values, cell.sort(1).values)
    if k == rows * cols:  # a full grid: slot i is always cell i
        assert (cell_g == torch.arange(k)).all()
    with pytest.raises(ValueError, match="layout"):
        sample_initial(1, k, layout="hexagonal")


def _gaussians(b=4, k=6, ch=3, valid=False):
    g = decode(_raw(b, k).float())
    if ch != 3:
        g.colors = torch.rand(b, k, ch)
    if valid:
        g.valid = torch.rand(b, k, generator=torch.Generator().manual_seed(3)) > 0.3
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_roundtrip(tmp_path, dtype):
    g = _gaussians(valid=True)
    labels = torch.tensor([3, 1, 4, 1])
    path = tmp_path / "sub" / "set.safetensors"
    save_gaussians(path, g, labels=labels, dtype=dtype, metadata={"height": 32, "note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["set.safetensors"]  # no temporary left behind
    h, lab, meta = load_gaussians(path)
    tol = 0 if dtype == torch.float32 else 2e-3
    for name in ("means", "scales", "angles", "colors", "opacities"):
        assert torch.allclose(getattr(h, name), getattr(g, name), atol=tol, rtol=tol), name
    assert torch.equal(h.valid, g.valid) and torch.equal(lab, labels)
    assert meta["height"] == "32" and meta["note"] == "x" and meta["format"] == "gvit.gaussians"
    assert torch.equal(h.counts(), g.valid.sum(1))


def test_save_rejects_bad_sets(tmp_path):
    g = _gaussians()
    g.scales = -g.scales
    with pytest.raises(ValueError, match="scales"):
        save_gaussians(tmp_path / "a.safetensors", g)
    g = _gaussians()
    with pytest.raises(ValueError, match="labels"):
        save_gaussians(tmp_path / "a.safetensors", g, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        save_gaussians(tmp_path / "a.safetensors", g, dtype=torch.bfloat16)
    assert not any(tmp_path.iterdir())


def test_load_names_the_file_and_field(tmp_path):
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_gaussians(corrupt)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_gaussians(tmp_path / "missing.safetensors")

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a gvit Gaussian file"):
        load_gaussians(other)

    g = _gaussians()
    good = {n: getattr(g, n).contiguous() for n in ("means", "scales", "angles", "colors", "opacities")}
    meta = {"format": "gvit.gaussians", "version": "1"}
    for field, value in [("opacities", torch.full((4, 6), 1.5)), ("means", torch.full((4, 6, 2), float("nan"))),
                         ("scales", torch.zeros(4, 6, 3)), ("colors", torch.zeros(4, 5, 3))]:
        bad = dict(good, **{field: value})
        p = tmp_path / f"bad_{field}.safetensors"
        save_file(bad, str(p), metadata=meta)
        with pytest.raises(ValueError, match=rf"bad_{field}\.safetensors.*{field}"):
            load_gaussians(p)
    missing = {k: v for k, v in good.items() if k != "angles"}
    p = tmp_path / "noangles.safetensors"
    save_file(missing, str(p), metadata=meta)
    with pytest.raises(ValueError, match="angles"):
        load_gaussians(p)


def test_gaussians_helpers():
    g = _gaussians(b=3, k=5, ch=1, valid=True)
    assert (g.batch_size, g.num_gaussians, g.channels) == (3, 5, 1)
    sub = g[1]
    assert sub.batch_size == 1 and torch.equal(sub.valid[0], g.valid[1])
    d = g.to(torch.float64)
    assert d.means.dtype == torch.float64 and d.valid.dtype == torch.bool
    assert torch.equal(g.masked_opacities() == 0, ~g.valid | (g.opacities == 0))
    assert torch.allclose(det_covariance(g.scales), torch.linalg.det(covariance(g.scales, g.angles)), rtol=1e-4)
    assert not math.isnan(float(conic(g.scales, g.angles).sum()))
