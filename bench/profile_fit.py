"""Where the time of a photo fit goes, and how close the CPU rasterizer runs to this machine's peak.

Profile: one photo fitted with ``gvit.fit.fit_gaussians`` (the library call ``gvit fit`` makes, with
``gvit fit``'s defaults unless flags say otherwise), its time split into the numba kernels (binning
the Gaussians into tiles, forward, backward; timed around each call) and the PyTorch side
(decoding, covariance and cull extents, loss, gradient bookkeeping, the Adam update; from cProfile),
plus reading the photo and writing what ``gvit fit`` writes for it (Gaussian file, render, overlay).

Roofline: the forward kernel's achieved Gaussian-pixel evaluations per second (pairs in the tile
lists, each tested and, where visible, blended) against the same kernel on a dense block (every tile
lists every Gaussian, every pair blended: its arithmetic with no culling and no early stop), and
against a per-pixel scalar loop with libm's ``exp`` (how the kernels ran before they took a tile's
pixels in vectorised inner loops), with the same number of threads.

    python bench/profile_fit.py                                     # McMaster 1.tif, k = 9,000, 50 iterations
    python bench/profile_fit.py --image ../shared/data/photos/cbsd68/0001.png --k 2000 --iters 100
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import numba as nb
import numpy as np

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "mcmaster18" / "1.tif"


class KernelTimer:
    """Wraps the numba kernels of the CPU rasterizer to time every call and count the pairs offered."""

    def __init__(self, kernels):
        self.kernels, self.seconds, self.calls, self.pairs = kernels, {}, {}, 0
        self.originals = {name: getattr(kernels, name) for name in ("bin_gaussians", "forward", "backward")}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(self.kernels, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.kernels, name, fn)

    def _timed(self, name, fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "forward":
                offsets, height, width, tile, n_tx = args[3], args[5], args[6], args[7], args[8]
                self.pairs += listed_pairs(offsets, height, width, tile, n_tx)
            return out
        return call


def listed_pairs(offsets: np.ndarray, height: int, width: int, tile: int, n_tx: int) -> int:
    """Gaussian-pixel pairs in the tile lists: each tile's list length times its pixel count."""
    counts = np.diff(offsets)
    n_tiles = n_tx * -(-height // tile)
    t = np.arange(len(counts)) % n_tiles
    tx, ty = t % n_tx, t // n_tx
    pixels = (np.minimum((tx + 1) * tile, width) - tx * tile) * (np.minimum((ty + 1) * tile, height) - ty * tile)
    return int((counts * pixels).sum())


@nb.njit(parallel=True, fastmath=False, cache=True)
def _scalar_blend(params, colors, xs, ys, out):
    """A per-pixel scalar loop over every (pixel, Gaussian) pair of a dense block, libm ``exp``."""
    for i in nb.prange(len(ys)):
        for j in range(len(xs)):
            r = 0.0
            gr = 0.0
            bl = 0.0
            trans = 1.0
            for g in range(params.shape[0]):
                dx = xs[j] - params[g, 0]
                dy = ys[i] - params[g, 1]
                power = -0.5 * (params[g, 2] * dx * dx + params[g, 4] * dy * dy) - params[g, 3] * dx * dy
                if power < params[g, 6] or power > 0:
                    continue
                alpha = params[g, 5] * np.exp(power)
                if alpha < 1.0 / 255.0:
                    continue
                alpha = min(alpha, 0.999)
                w = alpha * trans
                r += w * colors[g, 0]
                gr += w * colors[g, 1]
                bl += w * colors[g, 2]
                trans = trans * (1.0 - alpha)
            out[0, i, j], out[1, i, j], out[2, i, j] = r, gr, bl


def dense_pairs_per_second(kernels=None, *, rejected: bool = False, pixels: int = 128, gaussians: int = 512,
                           tile: int = 8, repeats: int = 3) -> float:
    """Pairs per second on a dense ``pixels`` x ``pixels`` block of ``gaussians`` wide, faint Gaussians
    (every pair passes the tests and is blended, transmittance never runs out: the most arithmetic a
    pair can cost; with ``rejected`` every pair fails the test before ``exp``: the least), through
    ``kernels.forward`` with every tile listing every Gaussian, or with ``kernels=None`` through
    :func:`_scalar_blend`."""
    rng = np.random.default_rng(0)
    params = np.zeros((1, gaussians, 7))
    params[0, :, 0:2] = rng.uniform(-1, 1, (gaussians, 2))
    params[0, :, 2] = params[0, :, 4] = 0.05  # conic of a Gaussian much wider than the block
    params[0, :, 5] = 0.01  # faint: alpha >= 0.008 everywhere, transmittance >= 0.005 after all of them
    params[0, :, 6] = 1.0 if rejected else -1e9
    colors = rng.uniform(0, 1, (1, gaussians, 3))
    if kernels is None:
        xs = np.linspace(-1, 1, pixels)
        out = np.empty((3, pixels, pixels))

        def run():
            _scalar_blend(params[0], colors[0], xs, xs, out)
    else:
        n_t = -(-pixels // tile)
        offsets = np.arange(n_t * n_t + 1, dtype=np.int64) * gaussians
        ids = np.tile(np.arange(gaussians, dtype=np.int32), n_t * n_t)

        def run():
            kernels.forward(params, colors, np.zeros((1, 3)), offsets, ids, pixels, pixels, tile, n_t, n_t, False)
    run()  # compile
    best = min(_timed(run) for _ in range(repeats))
    return pixels * pixels * gaussians / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--k", type=int, default=9000)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--top", type=int, default=12, help="PyTorch-side functions listed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other FitConfig settings")
    a = p.parse_args()

    import importlib

    import torch

    kernels = importlib.import_module("gvit.render._cpu_kernels")  # a profiler times the kernels themselves
    from gvit.data import read_image
    from gvit.fit import FitConfig, fit_gaussians
    from gvit.gaussians import compact, save_gaussians
    from gvit.viz import draw_ellipses, save_png, to_uint8

    t0 = time.perf_counter()
    image = read_image(a.image)[None]
    read_s = time.perf_counter() - t0
    h, w = image.shape[2:]
    cfg = FitConfig(num_gaussians=a.k, iters=a.iters, **{key: type(getattr(FitConfig(), key))(value)
                                                         for key, value in (kv.split("=", 1) for kv in a.set)})
    fit_gaussians(image, FitConfig(num_gaussians=64, iters=2), progress=False)  # compile and warm the kernels
    profiler = cProfile.Profile()
    with KernelTimer(kernels) as timer:
        t0 = time.perf_counter()
        profiler.enable()
        res = fit_gaussians(image, cfg, progress=False)
        profiler.disable()
        fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = Path("/tmp") / "gvit_profile_fit"
    out.mkdir(exist_ok=True)
    g = compact(res.gaussians)
    save_gaussians(out / "photo.gaussians.safetensors", g, metadata={"height": h, "width": w})
    save_png(out / "photo.recon.png", to_uint8(res.rendered[0]))
    save_png(out / "photo.overlay.png", draw_ellipses(image[0], g))
    write_s = time.perf_counter() - t0

    kernel_s = sum(timer.seconds.values())
    rows = [("bin Gaussians into tiles (numba)", timer.seconds.get("bin_gaussians", 0.0)),
            ("forward kernel (numba)", timer.seconds.get("forward", 0.0)),
            ("backward kernel (numba)", timer.seconds.get("backward", 0.0)),
            ("PyTorch side: decode, extents, loss, autograd, Adam", fit_s - kernel_s),
            ("read the photo", read_s), ("write Gaussians, render, overlay", write_s)]
    total = fit_s + read_s + write_s
    print(f"{Path(a.image).name} ({w}x{h}), k = {a.k}, {a.iters} iterations ({timer.calls.get('forward', 0)} "
          f"renders), torch {torch.__version__}, {nb.get_num_threads()} numba threads; "
          f"PSNR {float(res.psnr[0]):.2f} dB\n")
    print("| stage | seconds | per iteration (ms) | share |")
    print("|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {1000 * s / a.iters:.1f} | {100 * s / total:.0f}% |")
    print(f"| **total** | {total:.2f} | {1000 * total / a.iters:.1f} | 100% |\n")

    stats = pstats.Stats(profiler)
    entries = [(fn, st[3]) for fn, st in stats.stats.items()  # cumulative time per function
               if "gvit" in fn[0] or fn[0] == "~"]
    print("PyTorch-side functions by cumulative time (cProfile; they include the kernels they call):\n")
    print("| function | cumulative s |")
    print("|---|---|")
    for (file, line, name), cum in sorted(entries, key=lambda e: -e[1])[:a.top]:
        where = name if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"
        print(f"| `{where}` | {cum:.2f} |")

    achieved = timer.pairs / max(timer.seconds.get("forward", 1e-9), 1e-9)
    peak, rejected = dense_pairs_per_second(kernels), dense_pairs_per_second(kernels, rejected=True)
    scalar = dense_pairs_per_second()
    print(f"\nRoofline of the forward kernel ({timer.pairs / max(1, timer.calls.get('forward', 1)) / 1e6:.0f} M "
          "listed Gaussian-pixel pairs per render):\n")
    print("| | Gaussian-pixel pairs / s | vs the kernel on a dense block |")
    print("|---|---|---|")
    print(f"| forward kernel, achieved (listed pairs / forward time) | {achieved / 1e6:.0f} M | "
          f"{achieved / peak:.2f} |")
    print(f"| forward kernel, dense block, every pair blended (its peak) | {peak / 1e6:.0f} M | 1.00 |")
    print(f"| forward kernel, dense block, every pair rejected before exp | {rejected / 1e6:.0f} M | "
          f"{rejected / peak:.2f} |")
    print(f"| per-pixel scalar loop, libm exp, dense block, every pair blended | {scalar / 1e6:.0f} M | "
          f"{scalar / peak:.2f} |")


if __name__ == "__main__":
    main()
