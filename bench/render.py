"""Rasterizer benchmark: forward+backward time, Gaussian-pixels/s and peak memory.

Compares the fast CPU path (numba, tile-culled) with the dense float32 PyTorch formulation
(every Gaussian x pixel materialised, cumprod over k) in the same run. Each measurement runs
in a fresh subprocess so its peak resident memory (ru_maxrss minus the RSS before the first
render) is its own.

    python bench/render.py                 # the two cases of the README table
    python bench/render.py --repeats 10 --tile-sizes 4 8 16
"""

from __future__ import annotations

import argparse
import json
import math
import time

from _util import peak_rss_mb, rss_mb, run_child

CASES = [(64, 256, 32, 32), (1, 512, 224, 224)]


def measure(path: str, b: int, k: int, h: int, w: int, repeats: int, tile: int | None) -> dict:
    import torch

    from gvit.gaussians import conic
    from gvit.render import rasterize
    from gvit.render._torch import rasterize_torch

    g = torch.Generator().manual_seed(0)
    means = torch.rand(b, k, 2, generator=g) * 2 - 1
    scales = torch.exp(torch.empty(b, k, 2).uniform_(math.log(1 / 64), math.log(1 / 8), generator=g))
    angles = torch.rand(b, k, generator=g) * math.pi
    colors = torch.rand(b, k, 3, generator=g)
    opac = torch.empty(b, k).uniform_(0.2, 1.0, generator=g)
    params = [t.requires_grad_() for t in (means, scales, angles, colors, opac)]

    def step():
        if path == "dense":
            m, s, a, c, o = params
            out = rasterize_torch(m, conic(s, a), c, o, c.new_zeros(b, 3), h, w, max_elements=None)
        else:
            out = rasterize(*params, height=h, width=w, backend=path, tile_size=tile)
        out.square().mean().backward()

    base = rss_mb()
    step()  # warm-up (numba compile / cache load)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb(base)
    sec = min(times)
    return {"path": path, "tile": tile, "B": b, "k": k, "H": h, "W": w, "seconds": sec,
            "gpx_per_s": b * k * h * w / sec, "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of the fast path (best is kept)")
    p.add_argument("--dense-repeats", type=int, default=2, help="timed repetitions of the dense baseline")
    p.add_argument("--tile-sizes", type=int, nargs="*", default=[], help="also time the cpu path at these tiles")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        path, b, k, h, w, rep, tile = a.child
        print(json.dumps(measure(path, int(b), int(k), int(h), int(w), int(rep), int(tile) or None)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, best of repeats\n")
    print("| B | k | H x W | path | time (ms) | Gaussian-px/s | peak RSS (MB) | speed-up vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for b, k, h, w in CASES:
        dense = run_child(__file__, [str(x) for x in ("dense", b, k, h, w, a.dense_repeats, 0)])
        rows = [dense, run_child(__file__, [str(x) for x in ("cpu", b, k, h, w, a.repeats, 0)])]
        rows += [run_child(__file__, [str(x) for x in ("cpu", b, k, h, w, a.repeats, t)]) for t in a.tile_sizes]
        for r in rows:
            name = "dense torch (baseline)" if r["path"] == "dense" else f"gvit cpu (tile {r['tile'] or 'auto'})"
            print(f"| {b} | {k} | {h}x{w} | {name} | {r['seconds'] * 1e3:.1f} | {r['gpx_per_s'] / 1e6:,.0f} M "
                  f"| {r['peak_mb']:,.0f} | {dense['seconds'] / r['seconds']:.1f}x |")


if __name__ == "__main__":
    main()
