"""Starts and coarse-to-fine on photos: PSNR and seconds of ``fit_gaussians`` per variant, each
photo fitted alone (as ``gvit fit`` fits photos of different sizes), every variant on the same photos
in the same run.

A variant is ``ITERS:INIT[:COARSE_UNTIL]`` (``coarse_until``: the fraction of the iterations rendered
at half resolution). The first variant is the baseline of the ratio columns.

    python bench/fit_starts.py --photos ../shared/data/photos/mcmaster18 --limit 4 --k 9000 \\
        500:grid 150:grid 150:detail 150:grid:0.5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="ITERS:INIT[:COARSE_UNTIL]")
    p.add_argument("--photos", required=True, help="a folder of photos")
    p.add_argument("--limit", type=int, default=None, help="the first N photos, in name order")
    p.add_argument("--k", type=int, default=9000)
    a = p.parse_args()

    import torch

    from gvit.data import read_image
    from gvit.data.images import IMAGE_EXTENSIONS
    from gvit.fit import FitConfig, fit_gaussians

    files = sorted(f for f in Path(a.photos).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:a.limit]
    photos = [read_image(f)[None] for f in files]
    fit_gaussians(photos[0], FitConfig(num_gaussians=16, iters=2), progress=False)  # compile the kernels
    rows = []
    for spec in a.variants:
        iters, init, *coarse = spec.split(":")
        coarse_until = float(coarse[0]) if coarse else 0.0
        cfg = FitConfig(num_gaussians=a.k, iters=int(iters), init=init, coarse_until=coarse_until,
                        recipe="small")  # the starts compared on the fixed-budget recipe they were measured with
        psnrs, seconds = [], []
        for x in photos:
            t0 = time.perf_counter()
            psnrs.append(float(fit_gaussians(x, cfg, progress=False).psnr[0]))
            seconds.append(time.perf_counter() - t0)
        rows.append((spec, psnrs, seconds))
        print(f"{spec}: " + ", ".join(f"{q:.2f}" for q in psnrs), flush=True)
    base = rows[0]
    print(f"\n{len(files)} photos of {a.photos} ({', '.join(f.name for f in files)}), k = {a.k}, one photo at a "
          f"time, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| variant (iters:init[:coarse_until]) | median PSNR (dB) | mean PSNR (dB) | vs first (dB, median of "
          "differences) | seconds per photo | time vs first |")
    print("|---|---|---|---|---|---|")
    for spec, psnrs, seconds in rows:
        diff = statistics.median(q - b for q, b in zip(psnrs, base[1]))
        print(f"| `{spec}` | {statistics.median(psnrs):.2f} | {statistics.mean(psnrs):.2f} | {diff:+.2f} "
              f"| {statistics.mean(seconds):.1f} | {sum(seconds) / sum(base[2]):.2f}x |")


if __name__ == "__main__":
    main()
