"""Neighbour layers of the Gaussian classifier (gvit.models.neighbours)."""

import pytest
import torch
import torch.nn.functional as F

from gvit.gaussians import RAW_DIM, decode
from gvit.models import GaussianClassifier, NeighbourLayer, edge_features, nearest_neighbours
from gvit.models.neighbours import neighbour_max, neighbour_max_torch


def _loop_neighbours(points, count, valid):
    """Reference: sort every point's distances to the other valid points in a Python loop."""
    b, k, _ = points.shape
    out = []
    for n in range(b):
        rows = []
        for i in range(k):
            others = [(float(torch.dist(points[n, i], points[n, j])), j) for j in range(k) if j != i and valid[n, j]]
            rows.append([j for _, j in sorted(others)[:count]])
        out.append(rows)
    return out


def test_nearest_neighbours_match_a_sorted_loop_and_skip_invalid_points():
    torch.manual_seed(0)
    points = torch.rand(2, 9, 2, dtype=torch.float64) * 2 - 1
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # 6 valid points: 5 others each, fewer than the 7 asked for
    index, mask = nearest_neighbours(points, 7, valid)
    assert index.shape == mask.shape == (2, 9, 7)
    ref = _loop_neighbours(points, 7, valid)
    for n in range(2):
        for i in range(9):
            assert index[n, i][mask[n, i]].tolist() == ref[n][i]
    assert mask[0].all() and mask[1].sum(-1).tolist() == [5] * 6 + [6] * 3  # invalid points still see the 6 valid
    index, mask = nearest_neighbours(points[:, :3], 5)  # more neighbours asked for than points exist
    assert index.shape == (2, 3, 5) and mask.sum(-1).eq(2).all()
    with pytest.raises(ValueError, match="count"):
        nearest_neighbours(points, 0)


@pytest.mark.parametrize("pool", ["point", "edge"])
@pytest.mark.parametrize("count", [3, 6])
def test_neighbour_layer_matches_a_float64_per_point_reference(count, pool):
    # count 6 with one invalid point of 7: every point has only 5 neighbours (masked slots)
    torch.manual_seed(1)
    layer = NeighbourLayer(8, pool).double()
    raw = torch.randn(2, 7, RAW_DIM, dtype=torch.float64)
    g = decode(raw)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 6] = False
    index, mask = nearest_neighbours(g.means, count, valid)
    assert mask.all() == (count == 3)
    out = layer(x, g.means / 0.5, g.colors, index, mask)
    h = layer.norm(x)
    a_w, b_w = layer.node.weight.chunk(2, 0)
    a_b, _ = layer.node.bias.chunk(2, 0)
    for n in range(2):
        for i in range(7):
            pre = []
            for j in index[n, i][mask[n, i]].tolist():
                dc = g.colors[n, j] - g.colors[n, i]
                e = torch.cat([(g.means[n, j] - g.means[n, i]) / 0.5, dc, dc.abs()])
                pre.append(b_w @ (h[n, j] - h[n, i]) + layer.edge.weight @ e)
            if pool == "point":  # the max before the activation
                hidden = F.gelu(a_w @ h[n, i] + a_b + torch.stack(pre).amax(0))
            else:  # the max over per-edge activations
                hidden = torch.stack([F.gelu(a_w @ h[n, i] + a_b + e) for e in pre]).amax(0)
            ref = x[n, i] + layer.out.weight @ hidden + layer.out.bias
            assert torch.allclose(out[n, i], ref, atol=1e-12)


def _dense_layer(layer, x, g, index, mask, spacing):
    """Reference: the layer over the per-edge tensor [B, k, K, D] with autograd through amax."""
    centre, other = layer.node(layer.norm(x)).chunk(2, -1)
    b, k, d = other.shape
    gathered = torch.stack([other[n, index[n]] for n in range(b)])  # [B, k, K, D]
    pooled = (gathered + layer.edge(edge_features(g, index, spacing))).masked_fill(~mask[..., None], float("-inf"))
    has = mask.any(-1, keepdim=True)
    hidden = F.gelu(centre - other + torch.where(has, pooled.amax(2), torch.zeros(b, k, d, dtype=x.dtype)))
    return x + torch.where(has, layer.out(hidden), torch.zeros_like(hidden))


def test_neighbour_layer_gradients_match_the_dense_per_edge_formulation():
    # every input and weight, in float64, with masked slots (one invalid point)
    torch.manual_seed(4)
    layer = NeighbourLayer(6).double()
    raw = torch.randn(2, 9, RAW_DIM, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 4] = False
    grads, weights = [], torch.randn(2, 9, 6, dtype=torch.float64)
    for fast in (True, False):
        g = decode(raw)
        index, mask = nearest_neighbours(g.means, 8, valid)
        assert not mask.all()
        out = layer(x, g.means / 0.4, g.colors, index, mask) if fast else _dense_layer(layer, x, g, index, mask, 0.4)
        params = [x, raw, *layer.parameters()]
        grads.append((out, torch.autograd.grad((out * weights).sum(), params)))
    (out, fast), (ref, dense) = grads
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(fast, dense):
        assert torch.allclose(a, b, atol=1e-10)
    assert dense[1].abs().sum() > 0  # the Gaussians get a gradient through positions and colours


def test_per_edge_pooling_passes_gradcheck_and_differs_from_per_point_pooling():
    torch.manual_seed(5)
    layer = NeighbourLayer(4, "edge").double()
    g = decode(torch.randn(1, 6, RAW_DIM, dtype=torch.float64))
    index, mask = nearest_neighbours(g.means, 3)
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, g.means / 0.5, g.colors, index, mask), (x,))
    point = NeighbourLayer(4, "point").double()
    point.load_state_dict(layer.state_dict())  # the same weights: the pooling order alone differs
    with torch.no_grad():
        assert not torch.allclose(layer(x, g.means / 0.5, g.colors, index, mask),
                                  point(x, g.means / 0.5, g.colors, index, mask))
    with pytest.raises(ValueError, match="pool"):
        NeighbourLayer(4, "mean")


def test_neighbour_layer_is_permutation_equivariant_and_a_lone_point_passes_through():
    torch.manual_seed(2)
    layer = NeighbourLayer(8)
    raw = torch.randn(1, 10, RAW_DIM)
    x = torch.randn(1, 10, 8)

    def run(raw, x, valid=None):
        g = decode(raw)
        index, mask = nearest_neighbours(g.means, 4, valid)
        return layer(x, g.means / 0.3, g.colors, index, mask)

    perm = torch.randperm(10)
    assert torch.allclose(run(raw, x)[:, perm], run(raw[:, perm], x[:, perm]), atol=1e-6)
    valid = torch.zeros(1, 10, dtype=torch.bool)
    valid[0, 3] = True  # one valid point has no neighbours: unchanged, finite gradients
    x.requires_grad_(True)
    out = run(raw, x, valid)
    assert torch.allclose(out[0, 3], x[0, 3])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("neighbours", [0, 3])
def test_splat_classifier_ignores_padding_and_trains_its_neighbour_layers(neighbours):
    torch.manual_seed(3)
    model = GaussianClassifier(8, 3, "micro", pool="mean", features="splat", neighbours=neighbours).eval()
    g = torch.randn(2, 8, RAW_DIM)
    valid = torch.tensor([[True] * 5 + [False] * 3] * 2)
    other = g.clone()
    other[:, 5:] = torch.randn(2, 3, RAW_DIM) * 5
    assert torch.allclose(model(g, valid), model(other, valid), atol=1e-5)
    model(g).sum().backward()
    assert len(model.local) == (2 if neighbours else 0)
    assert all(layer.edge.weight.grad.abs().sum() > 0 for layer in model.local)
    with pytest.raises(ValueError, match="neighbours"):
        GaussianClassifier(8, 3, "micro", neighbours=-1)


def test_neighbourhoods_are_unchanged_by_a_flip_so_a_cache_can_hold_them():
    from gvit.train.data import flip_gaussians

    torch.manual_seed(4)
    model = GaussianClassifier(16, 3, "micro", features="splat", neighbours=4, neighbour_layers=1).eval()
    g = torch.randn(5, 16, RAW_DIM)
    flipped = flip_gaussians(g, torch.tensor([True, False, True, True, False]))
    hoods = model.neighbourhoods(g)
    assert all(torch.equal(a, b) for a, b in zip(hoods, model.neighbourhoods(flipped)))
    assert torch.equal(model(flipped, neighbourhoods=hoods), model(flipped))
    # the given neighbourhoods are the ones used: another set changes the output
    other = (hoods[0].roll(1, dims=1), hoods[1])
    assert not torch.allclose(model(flipped, neighbourhoods=other), model(flipped))
    assert GaussianClassifier(16, 3, "micro", features="splat").neighbourhoods(g) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neighbour_max_kernels_match_the_torch_formulation(dtype):
    # the numba kernels (CPU float tensors) against the PyTorch ops every other device uses, with
    # masked slots, and their gradients by finite differences
    torch.manual_seed(5)
    points = torch.rand(3, 12, 2, dtype=dtype) * 2 - 1
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[2, 8:] = False
    index, mask = nearest_neighbours(points, 9, valid)
    assert not mask.all()
    inputs = [torch.randn(3, 12, 7, dtype=dtype), torch.rand(3, 12, 3, dtype=dtype), torch.randn(7, 3, dtype=dtype)]
    weights = torch.randn(3, 12, 7, dtype=dtype)
    results = []
    for fn in (neighbour_max, neighbour_max_torch):
        args = [t.clone().requires_grad_() for t in inputs]
        out = fn(args[0], args[1], index, mask, args[2])
        results.append((out, torch.autograd.grad((out * weights).sum(), args)))
    (out, grads), (ref, ref_grads) = results
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    has = mask.any(-1)  # a point without valid neighbours gets an arbitrary value
    assert torch.allclose(out[has], ref[has], atol=tol)
    for a, b in zip(grads, ref_grads):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=tol)
    if dtype == torch.float64:
        args = [t.clone().requires_grad_() for t in inputs]
        assert torch.autograd.gradcheck(lambda v, c, w: neighbour_max(v, c, index, mask, w), args)
