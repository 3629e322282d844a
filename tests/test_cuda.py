"""The CUDA paths: the dense torch rasterizer and the gsplat backend on the GPU against the float64
reference, a GViT run with bf16 autocast, and the collectives over an NCCL process group.

These need a GPU and are skipped without one (CI has none); the CPU counterparts of the same code are
tested in the other files. docs/results/gpu.md records where and when they last ran.
"""

import math
import os

import pytest
import torch

from gvit.data.shards import load_shards
from gvit.distributed import all_ranks, all_reduce_grads
from gvit.fit import FitConfig, fit_gaussians
from gvit.render import rasterize
from gvit.render._gsplat import available as gsplat_available
from gvit.tools.fit_dataset import fit_dataset
from gvit.train import make_config, load_checkpoint, train
from reference import random_scene, reference_render

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCENES = {
    "rgb-nonsquare": (2, 40, 3, 19, 27, {}),
    "gray": (2, 30, 1, 16, 16, {}),
    "outside": (2, 30, 3, 16, 20, {"spread": 2.5}),
    "opaque-stack": (2, 60, 3, 18, 18, {"opacity": (0.9, 1.0), "log_scale": (math.log(0.2), math.log(0.8))}),
    "many-32px": (8, 256, 3, 32, 32, {"log_scale": (math.log(1 / 64), math.log(1 / 8))}),
}


def _rel(a, b):
    return ((a.double().cpu() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", ["torch", "gsplat"])
@pytest.mark.parametrize("name", list(SCENES))
def test_cuda_backends_match_float64_reference(backend, name):
    if backend == "gsplat" and not gsplat_available():
        pytest.skip("gsplat is not installed")
    n_img, k, n_ch, h, w, opts = SCENES[name]
    scene = random_scene(n_img, k, n_ch, seed=list(SCENES).index(name), **opts)
    bg = torch.rand(n_ch, generator=torch.Generator().manual_seed(7))
    params = [t.cuda().requires_grad_() for t in scene]
    bg_a = bg.cuda().requires_grad_()
    out = rasterize(*params, height=h, width=w, background=bg_a, backend=backend)
    assert out.is_cuda and out.shape == (n_img, n_ch, h, w)

    ref_params = [t.double().requires_grad_() for t in scene]
    bg_r = bg.double().requires_grad_()
    ref = reference_render(*ref_params, h, w, background=bg_r)
    err = (out.detach().double().cpu() - ref.detach()).abs()
    assert torch.quantile(err.flatten(), 0.999).item() < 1e-4, f"max error {err.max().item():.2e}"

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights.cuda()).sum(), params + [bg_a])
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_params + [bg_r])
    for label, g, gr in zip(["means", "scales", "angles", "colors", "opacities", "background"], grads, ref_grads):
        assert _rel(g, gr) < 1e-2, f"{label}: relative gradient error {_rel(g, gr):.2e}"


def test_auto_backend_on_cuda_is_gsplat_when_installed_else_torch():
    scene = [t.cuda() for t in random_scene(2, 20, 3, seed=3)]
    auto = rasterize(*scene, height=16, width=16)
    chosen = rasterize(*scene, height=16, width=16, backend="gsplat" if gsplat_available() else "torch")
    assert torch.equal(auto, chosen)


def test_gvit_trains_on_cuda_with_bf16_autocast(tmp_path):
    cfg = make_config(data="shapes:128", limit_eval=64, encoder_size="micro", classifier_size="micro", image_size=16,
                      patch=4, num_gaussians=16, batch_size=32, steps=12, log_every=2, checkpoint_every=100,
                      classifier_from=0.25, pretrain_until=0.5, guidance_from=0.75, guidance_every=2, device="cuda",
                      precision="bf16", out=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    assert result["finished"] and 0 <= result["top1"] <= 1 and math.isfinite(result["psnr"])
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    weights = list(state["encoder"].values()) + list(state["classifier"].values())
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in weights if t.is_floating_point())


def test_collectives_over_nccl(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        assert all_ranks(True) and not all_ranks(False)
        p = torch.nn.Parameter(torch.ones(3, device="cuda"))
        q = torch.nn.Parameter(torch.ones(2, device="cuda"))
        p.grad = torch.tensor([1.0, 2.0, 3.0], device="cuda")  # q has no gradient: reduced as zeros
        all_reduce_grads([p, q])
        assert torch.equal(p.grad.cpu(), torch.tensor([1.0, 2.0, 3.0])) and torch.equal(q.grad.cpu(), torch.zeros(2))
    finally:
        torch.distributed.destroy_process_group()


def test_fit_dataset_on_cuda_matches_the_cpu(tmp_path):
    cfg = FitConfig(num_gaussians=16, iters=40, backend="torch")
    gpu = fit_dataset("shapes:12", tmp_path / "gpu", cfg, shard_size=8, device="cuda", progress=False)
    cpu = fit_dataset("shapes:12", tmp_path / "cpu", cfg, shard_size=8, device="cpu", progress=False)
    assert abs(gpu["mean_psnr"] - cpu["mean_psnr"]) < 0.5 and gpu["mean_psnr"] > 15
    g, labels = load_shards(tmp_path / "gpu")[:2]
    assert g.means.device.type == "cpu" and labels.shape == (12,)
    images = torch.rand(3, 3, 16, 16)
    res = fit_gaussians(images.cuda(), FitConfig(num_gaussians=8, iters=5), progress=False).to("cpu")
    assert res.raw.device.type == res.rendered.device.type == res.gaussians.means.device.type == "cpu"
