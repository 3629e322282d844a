"""GPU benchmark: the rasterizer backends and the training steps on one CUDA device.

Render: forward+backward of ``mean(img²)`` with the dense torch path (baseline) and gsplat's tile
rasterizer (when installed), time (best of ``--repeats`` after warm-up), Gaussian-pixels/s, peak CUDA
memory and the largest difference of gsplat's image from the torch path's. Scenes as in
bench/render.py (σ log-uniform in [1/64, 1/8], opacity uniform in [0.2, 1]).

Train: seconds per optimisation step of the CPU CIFAR-10 recipe's models (configs/cifar10_cpu.yaml,
``--size``, batch ``--batch`` of 32x32 images, k Gaussians) in bf16 autocast and in fp32, with the
ratio to the bf16 patch ViT step.

    python bench/cuda.py
    python bench/cuda.py --sections train --size S --batch 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from _util import case_config

RENDER_CASES = [(64, 256, 32, 32), (1, 512, 224, 224), (16, 4096, 224, 224)]
TRAIN_CASES = ("patch_vit", "gvit:encoder", "gvit:joint", "gvit:guidance")
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "cifar10_cpu.yaml"


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def render_rows(repeats: int) -> list[dict]:
    from gvit.render import rasterize
    from gvit.render._gsplat import available

    backends = ["torch"] + (["gsplat"] if available() else [])
    rows = []
    for b, k, h, w in RENDER_CASES:
        g = torch.Generator().manual_seed(0)
        scene = [torch.rand(b, k, 2, generator=g) * 2 - 1,
                 torch.exp(torch.empty(b, k, 2).uniform_(math.log(1 / 64), math.log(1 / 8), generator=g)),
                 torch.rand(b, k, generator=g) * math.pi, torch.rand(b, k, 3, generator=g),
                 torch.empty(b, k).uniform_(0.2, 1.0, generator=g)]
        params = [t.cuda().requires_grad_() for t in scene]
        images = {}
        for backend in backends:
            def step():
                out = rasterize(*params, height=h, width=w, backend=backend)
                out.square().mean().backward()
                images[backend] = out.detach()

            torch.cuda.reset_peak_memory_stats()
            sec = _best_seconds(step, repeats)
            rows.append({"B": b, "k": k, "H": h, "W": w, "path": backend, "seconds": sec,
                         "gpx_per_s": b * k * h * w / sec,
                         "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                         "max_diff": (images[backend] - images["torch"]).abs().max().item()})
    return rows


def train_rows(size: str, batch: int, k: int, repeats: int) -> list[dict]:
    from gvit.train import model_step, step_generator

    rows = []
    for precision in ("bf16", "fp32"):
        for case in TRAIN_CASES:
            cfg = case_config(RECIPE, case, [f"encoder_size={size}", f"classifier_size={size}", f"batch_size={batch}",
                                             f"num_gaussians={k}", "steps=1000", "image_size=32", "device=cuda",
                                             f"precision={precision}"])
            run = model_step(cfg, 10, torch.device("cuda"))
            images, labels = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            counter = iter(range(10**6))

            def step():
                i = next(counter)
                run.step(i, images, labels, step_generator(cfg.seed, i), 0, 1)

            torch.cuda.reset_peak_memory_stats()
            sec = _best_seconds(step, repeats)
            rows.append({"case": case, "precision": precision, "seconds": sec,
                         "peak_mb": torch.cuda.max_memory_allocated() / 2**20})
            run = None  # frees the models before the next case
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="*", default=["render", "train"], choices=["render", "train"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cuda.py: no CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    if "render" in a.sections:
        rows = render_rows(a.repeats)
        print("| B | k | H x W | path | time (ms) | Gaussian-px/s | peak CUDA memory (MB) | speed-up vs torch "
              "| max abs diff vs torch |")
        print("|---|---|---|---|---|---|---|---|---|")
        base = {}
        for r in rows:
            key = (r["B"], r["k"], r["H"])
            base.setdefault(key, r["seconds"])
            print(f"| {r['B']} | {r['k']} | {r['H']}x{r['W']} | {r['path']} | {1e3 * r['seconds']:.2f} "
                  f"| {r['gpx_per_s'] / 1e9:,.1f} G | {r['peak_mb']:,.0f} | {base[key] / r['seconds']:.1f}x "
                  f"| {r['max_diff']:.1e} |")
        print()
    if "train" in a.sections:
        rows = train_rows(a.size, a.batch, a.k, a.repeats)
        base = rows[0]["seconds"]
        print(f"{a.size}, batch {a.batch}, k = {a.k}, 32x32 images\n")
        print("| step | precision | s / step | images / s | peak CUDA memory (MB) | vs bf16 patch ViT |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['precision']} | {r['seconds']:.4f} | {a.batch / r['seconds']:,.0f} "
                  f"| {r['peak_mb']:,.0f} | {r['seconds'] / base:.2f}x |")


if __name__ == "__main__":
    main()
