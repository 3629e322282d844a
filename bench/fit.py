"""Fitting benchmark: quality against iterations and seconds, throughput, pruning trade-off.

Real data from ../shared/data (read-only, never copied): CIFAR-10 test images (evenly spaced
over the 10,000, so every class is in) and the 500x500 McMaster photos. Every case runs in a
fresh process (its own peak RSS). Tables print as Markdown.

    python bench/fit.py                          # everything (about 45 minutes on 2 cores)
    python bench/fit.py --sections cifar         # one section: cifar, baseline, photos, prune
    python bench/fit.py --cifar-images 64 --photos 1.tif --iters 200   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _util import peak_rss_mb, rss_mb, run_child

DATA = Path(os.environ.get("GVIT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
CIFAR = DATA / "cifar10" / "test.zip"
PHOTOS = DATA / "photos" / "mcmaster18"
CHECKPOINTS = (50, 100, 200, 500, 1000, 2000)


def load(source: str, n: int):
    import torch

    from gvit.data import ImageFolder, read_image

    if source == "cifar":
        ds = ImageFolder(CIFAR)
        idx = torch.linspace(0, len(ds) - 1, n).long().tolist()
        return torch.stack([ds[i][0] for i in idx])
    return read_image(PHOTOS / source)[None]


def measure(spec: dict) -> dict:
    from gvit.fit import FitConfig, fit_gaussians
    from gvit.gaussians import compression_ratio

    images = load(spec["source"], spec["n"])
    cfg = FitConfig(**spec["config"])
    base = rss_mb()
    fit_gaussians(images[:1], cfg, iters=2)  # warm-up: numba compile / cache load
    t0 = time.perf_counter()
    res = fit_gaussians(images, cfg)
    seconds = time.perf_counter() - t0
    h, w = images.shape[2:]
    at = {str(s): p for s, _, p in res.history if s in CHECKPOINTS}
    sec_at = {str(s): t for s, t, _ in res.history if s in CHECKPOINTS}
    counts = res.gaussians.counts().double()
    return {
        "spec": spec, "psnr": float(res.psnr.mean()), "psnr_min": float(res.psnr.min()),
        "ssim": float(res.ssim.mean()), "seconds": seconds, "img_per_s": len(images) / seconds,
        "count": float(counts.mean()), "ratio_fp16": float(compression_ratio(counts, h, w).mean()),
        "psnr_at": at, "seconds_at": sec_at, "peak_mb": peak_rss_mb(base),
        "psnr_before_prune": float(res.psnr_before_prune.mean()),
    }


def case(source: str, n: int, **config) -> dict:
    return run_child(__file__, [json.dumps({"source": source, "n": n, "config": config})])


def cifar_section(a) -> None:
    print(f"\n### CIFAR-10 test, {a.cifar_images} images (32x32), {a.iters} iterations, MSE, batched\n")
    print("| init | k | PSNR (dB) | min PSNR | SSIM | seconds | images/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    curves = {}
    for k in a.ks:
        for init in a.inits:
            r = case("cifar", a.cifar_images, num_gaussians=k, init=init, iters=a.iters)
            curves[(init, k)] = r
            print(f"| {init} | {k} | {r['psnr']:.2f} | {r['psnr_min']:.2f} | {r['ssim']:.4f} | {r['seconds']:.1f} "
                  f"| {r['img_per_s']:.2f} | {r['peak_mb']:.0f} |", flush=True)
    marks = [s for s in CHECKPOINTS if s <= a.iters]
    print(f"\nPSNR (dB) against iterations (seconds in brackets), k = {a.ks[len(a.ks) // 2]}:\n")
    print("| init | " + " | ".join(f"{s} it" for s in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for init in a.inits:
        r = curves[(init, a.ks[len(a.ks) // 2])]
        cells = [f"{r['psnr_at'][str(s)]:.2f} ({r['seconds_at'][str(s)]:.0f} s)" for s in marks]
        print(f"| {init} | " + " | ".join(cells) + " |")


def baseline_section(a) -> None:
    n, iters = 16, 20
    print(f"\n### Throughput against the dense PyTorch formulation ({n} CIFAR images, k = 256, {iters} "
          "iterations each, extrapolated to 500)\n")
    print("| renderer | s / iteration | images/s at 500 iterations | speed-up |")
    print("|---|---|---|---|")
    dense = case("cifar", n, num_gaussians=256, init="grid", iters=iters, backend="torch")
    fast = case("cifar", n, num_gaussians=256, init="grid", iters=iters, backend="cpu")
    for name, r in (("dense torch (baseline)", dense), ("gvit cpu", fast)):
        per_iter = r["seconds"] / iters
        print(f"| {name} | {per_iter:.3f} | {n / (per_iter * 500):.2f} | {dense['seconds'] / r['seconds']:.1f}x |")


def photo_section(a) -> None:
    print(f"\n### Photos (McMaster, 500x500), {a.photo_iters} iterations, MSE, one image at a time, the small "
          "recipe (the photo recipe: bench/fit_photos.py)\n")
    print("| photo | init | k | PSNR (dB) | SSIM | seconds | bytes fp16 | ratio vs 8-bit pixels | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [(p, init, a.photo_k) for p in a.photos for init in a.inits]
    runs += [(a.photos[0], "grid", k) for k in a.photo_ks if k != a.photo_k]
    for photo, init, k in runs:
        r = case(photo, 1, num_gaussians=k, init=init, iters=a.photo_iters, recipe="small")  # compares the starts
        print(f"| {photo} | {init} | {k} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['seconds']:.0f} "
              f"| {r['count'] * 18:,.0f} | {r['ratio_fp16']:.1f}x | {r['peak_mb']:.0f} |", flush=True)


def prune_section(a) -> None:
    k = 256
    print(f"\n### Luminance-aware pruning, CIFAR-10 test, {a.cifar_images} images, k = {k}, grid, "
          f"{a.iters} iterations, L1 on opacity {a.l1}, pruned at 60%\n")
    print("| tau | L1 | mean count | compression vs 8-bit pixels (fp16) | PSNR (dB) | PSNR lost |")
    print("|---|---|---|---|---|---|")
    ref = case("cifar", a.cifar_images, num_gaussians=k, init="grid", iters=a.iters)
    print(f"| - | 0 | {ref['count']:.1f} | {ref['ratio_fp16']:.2f}x | {ref['psnr']:.2f} | 0.00 |", flush=True)
    for tau in a.taus:
        r = case("cifar", a.cifar_images, num_gaussians=k, init="grid", iters=a.iters, l1_opacity=a.l1,
                 prune_tau=tau)
        print(f"| {tau} | {a.l1} | {r['count']:.1f} | {r['ratio_fp16']:.2f}x | {r['psnr']:.2f} "
              f"| {ref['psnr'] - r['psnr']:.2f} |", flush=True)


SECTIONS = {"cifar": cifar_section, "baseline": baseline_section, "photos": photo_section, "prune": prune_section}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--cifar-images", type=int, default=256)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--ks", type=int, nargs="*", default=[64, 256, 1024])
    p.add_argument("--inits", nargs="*", default=["random", "grid", "kmeans", "superpixel"])
    p.add_argument("--photos", nargs="*", default=["5.tif", "1.tif"])
    p.add_argument("--photo-k", type=int, default=4096)
    p.add_argument("--photo-ks", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--photo-iters", type=int, default=1000)
    p.add_argument("--taus", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(json.loads(a.child))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {DATA.resolve()}")
    for name in a.sections:
        SECTIONS[name](a)


if __name__ == "__main__":
    main()
