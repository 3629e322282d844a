"""Rate-distortion of gvit's ``.gvc`` codec against JPEG, WebP and AVIF (Pillow) on the shared photos.

gvit: every photo at each ``--bpp`` target through :func:`gvit.codec.encode_image` (what ``gvit encode
--bpp R`` runs per image, defaults otherwise), then decoded from the bytes alone with
:func:`gvit.codec.decode_image` (what ``gvit decode`` renders). Baselines: Pillow's JPEG (4:2:0, the
default), WebP (method 4, the default) and AVIF (speed 6, Pillow's default) over a sweep of qualities.
Every decoded image is rounded to 8 bits and compared with the 8-bit original: PSNR over RGB and SSIM
(gvit.losses.ssim, 11x11 Gaussian window). BD-rate is the Bjontegaard delta rate of gvit against each codec
(the ``bjontegaard`` package, ``cubic``: VCEG-M33's cubic fit of log-rate against PSNR over the overlap),
per photo, with the baseline's points within 1.5 dB of gvit's range; the table gives its mean and median
over the photos. Negative: gvit needs fewer bits for the same PSNR.

Per-photo rows go to ``--results`` (JSON lines) as they finish, so an interrupted run resumes. One run at
a time, nothing else beside it: the seconds are wall-clock on this machine.

    python bench/codec.py                                   # all 18 McMaster + the 65 CBSD68 photos not chosen on
    python bench/codec.py --folders mcmaster18 --limit 2 --rates 0.25 1.0   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import peak_rss_mb  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GVIT_DATA", HERE / ".." / "shared" / "data"))
VAL_PHOTOS = {"101085", "101087", "102061"}  # CBSD68 photos the codec's settings were chosen on (docs/codec.md)
QUALITIES = {"JPEG": [2, 5, 8, 12, 16, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95],
             "WEBP": [0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95],
             "AVIF": [2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90]}
BASELINES = tuple(QUALITIES)


def metrics(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two ``[H, W, 3]`` uint8 images."""
    from gvit.losses import ssim

    mse = np.mean((decoded.astype(np.float64) - original.astype(np.float64)) ** 2)
    p = 10 * math.log10(255.0 ** 2 / max(mse, 1e-12))
    t = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    return p, float(ssim(t(decoded), t(original))[0])


def baseline_points(image: Image.Image, original: np.ndarray, fmt: str) -> list[dict]:
    points = []
    for q in QUALITIES[fmt]:
        buf = io.BytesIO()
        t0 = time.perf_counter()
        image.save(buf, fmt, quality=q)
        enc = time.perf_counter() - t0
        size = buf.tell()
        buf.seek(0)
        t0 = time.perf_counter()
        decoded = np.asarray(Image.open(buf).convert("RGB"))
        dec = time.perf_counter() - t0
        p, s = metrics(decoded, original)
        points.append({"quality": q, "bpp": 8 * size / (original.shape[0] * original.shape[1]), "psnr": p, "ssim": s,
                       "encode_s": enc, "decode_s": dec})
    return points


def gvit_points(path: Path, original: np.ndarray, rates: list[float]) -> list[dict]:
    from gvit.codec import decode_image, encode_image, quantize, read_header
    from gvit.codec.entropy import placement_bits
    from gvit.data import read_image
    from gvit.viz import to_uint8

    image = read_image(path)
    points = []
    for rate in rates:
        res = encode_image(image, bpp=rate)
        t0 = time.perf_counter()
        decoded = decode_image(res.data)
        dec = time.perf_counter() - t0
        p, s = metrics(to_uint8(decoded), original)
        header = read_header(res.data)
        sym = quantize(res.gaussians, header.height, header.width, header.bits)[0]
        points.append({"target": rate, "bpp": res.bpp, "psnr": p, "ssim": s, "psnr_float": res.psnr,
                       "encode_s": res.seconds, "decode_s": dec, "count": res.count, "bytes": len(res.data),
                       "placement": placement_bits(sym, header.height, header.width, header.bits)})
    return points


def bd_rate(test: list[dict], anchor: list[dict]) -> float | None:
    """BD-rate (%) of ``test`` against ``anchor`` points, or None where the curves do not overlap enough."""
    import bjontegaard

    lo, hi = min(p["psnr"] for p in test) - 1.5, max(p["psnr"] for p in test) + 1.5
    near = sorted((p for p in anchor if lo <= p["psnr"] <= hi), key=lambda p: p["bpp"])
    if len(near) < 4:
        near = sorted(anchor, key=lambda p: min(abs(p["psnr"] - lo), abs(p["psnr"] - hi)))[:4]
        near.sort(key=lambda p: p["bpp"])
    test = sorted(test, key=lambda p: p["bpp"])
    try:
        return float(bjontegaard.bd_rate([p["bpp"] for p in near], [p["psnr"] for p in near],
                                         [p["bpp"] for p in test], [p["psnr"] for p in test], method="cubic",
                                         require_matching_points=False, min_overlap=0.5))
    except (ValueError, AssertionError, np.linalg.LinAlgError):
        return None


def interpolate(points: list[dict], bpp: float, key: str = "psnr") -> float | None:
    """``key`` at ``bpp`` on a codec's curve (linear in log-rate), None outside its measured range."""
    pts = sorted(points, key=lambda p: p["bpp"])
    xs = [math.log(p["bpp"]) for p in pts]
    x = math.log(bpp)
    if not pts or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[key] for p in pts]))


def summarise(rows: list[dict], rates: list[float], folder: str) -> str:
    lines = [f"\n### {folder}: {len(rows)} photos\n",
             "| target bpp | gvit bpp | gvit PSNR | gvit SSIM | JPEG PSNR | WebP PSNR | AVIF PSNR | Gaussians | "
             "encode s | decode s |", "|" + "---|" * 10]
    for i, rate in enumerate(rates):
        g = [r["gvit"][i] for r in rows]
        at = {fmt: [interpolate(r[fmt], p["bpp"]) for r, p in zip(rows, g)] for fmt in BASELINES}

        def mean_at(fmt):
            vals = [v for v in at[fmt] if v is not None]
            if not vals:
                return "-"
            return f"{statistics.mean(vals):.2f}" + ("" if len(vals) == len(g) else f" ({len(vals)})")

        lines.append(f"| {rate:g} | {statistics.mean(p['bpp'] for p in g):.3f} | "
                     f"{statistics.mean(p['psnr'] for p in g):.2f} | {statistics.mean(p['ssim'] for p in g):.4f} | "
                     f"{mean_at('JPEG')} | {mean_at('WEBP')} | {mean_at('AVIF')} | "
                     f"{statistics.mean(p['count'] for p in g):.0f} | "
                     f"{statistics.mean(p['encode_s'] for p in g):.2f} | "
                     f"{statistics.mean(p['decode_s'] for p in g):.3f} |")
    lines += ["", "| BD-rate of gvit against | mean | median | photos with overlap |", "|---|---|---|---|"]
    for fmt in BASELINES:
        vals = [v for v in (bd_rate(r["gvit"], r[fmt]) for r in rows) if v is not None]
        if vals:
            lines.append(f"| {fmt} | {statistics.mean(vals):+.1f}% | {statistics.median(vals):+.1f}% | "
                         f"{len(vals)} / {len(rows)} |")
    place = [p["placement"] for r in rows for p in r["gvit"]]
    lines += ["", "| placement bits per Gaussian | canonical (file) | listed (order kept) | saved | log2(n!)/n |",
              "|---|---|---|---|---|",
              "| mean over all files | " + " | ".join(f"{statistics.mean(p[k] for p in place):.2f}" for k in
                                                     ("canonical", "listed", "saved", "log2_factorial")) + " |"]
    for fmt in BASELINES:
        lines.append(f"\n{fmt}: encode {statistics.mean(p['encode_s'] for r in rows for p in r[fmt]):.3f} s, "
                     f"decode {statistics.mean(p['decode_s'] for r in rows for p in r[fmt]):.3f} s per image "
                     f"(mean over qualities)")
    return "\n".join(lines)


def plot(rows_by_folder: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_folder), figsize=(6 * len(rows_by_folder), 4.5), squeeze=False)
    grid = np.exp(np.linspace(math.log(0.08), math.log(1.6), 40))
    for ax, (folder, rows) in zip(axes[0], rows_by_folder.items()):
        for name, key in (("gvit (.gvc)", "gvit"), ("JPEG", "JPEG"), ("WebP", "WEBP"), ("AVIF", "AVIF")):
            xs, ys = [], []
            for b in grid:
                vals = [interpolate(r[key], b) for r in rows]
                if all(v is not None for v in vals):
                    xs.append(b)
                    ys.append(statistics.mean(vals))
            ax.plot(xs, ys, label=name, lw=2.5 if key == "gvit" else 1.5)
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel("PSNR (dB), mean over photos")
        ax.set_title(f"{folder} ({len(rows)} photos)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", nargs="+", default=["mcmaster18", "cbsd68"], help="folders under photos/")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.9, 1.5], help="gvit's bpp targets")
    p.add_argument("--limit", type=int, default=None, help="N photos of each folder, in name order")
    p.add_argument("--with-val", action="store_true", help="include the photos the codec's settings were chosen on")
    p.add_argument("--results", type=Path, default=Path("runs/bench_codec.jsonl"))
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    a = p.parse_args()
    a.results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if a.results.is_file():
        for line in a.results.read_text().splitlines():
            row = json.loads(line)
            if row["rates"] == a.rates:
                done[(row["folder"], row["photo"])] = row
    by_folder = {}
    start = time.perf_counter()
    for folder in a.folders:
        photos = sorted(f for f in (DATA / "photos" / folder).iterdir() if f.suffix.lower() in (".png", ".tif"))
        if not a.with_val:
            photos = [f for f in photos if f.stem not in VAL_PHOTOS]
        photos = photos[:a.limit] if a.limit else photos
        rows = []
        for i, path in enumerate(photos):
            key = (folder, path.stem)
            if key not in done:
                image = Image.open(path).convert("RGB")
                original = np.asarray(image)
                row = {"folder": folder, "photo": path.stem, "rates": a.rates,
                       "gvit": gvit_points(path, original, a.rates),
                       **{fmt: baseline_points(image, original, fmt) for fmt in BASELINES}}
                with open(a.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key] = row
                print(f"{folder} {i + 1}/{len(photos)} {path.stem}: " + ", ".join(
                    f"{q['bpp']:.3f} bpp {q['psnr']:.2f} dB" for q in row["gvit"]) +
                      f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            rows.append(done[key])
        by_folder[folder] = rows
    print(f"# gvit .gvc against Pillow's JPEG / WebP / AVIF (rates {a.rates}, {time.perf_counter() - start:.0f} s, "
          f"peak memory {peak_rss_mb():.0f} MiB)")
    for folder, rows in by_folder.items():
        print(summarise(rows, a.rates, folder))
    if a.plot:
        plot(by_folder, a.plot)
        print(f"\nwrote {a.plot}")


if __name__ == "__main__":
    main()
