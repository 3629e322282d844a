"""The ``gvit`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from .data import SHAPE_CLASSES, make_shapes
    from .gaussians import decode, encode, sample_initial, save_gaussians
    from .losses import psnr, reconstruction_loss, ssim
    from .render import render

    torch.manual_seed(args.seed)
    images, labels, _ = make_shapes(args.images, args.size, seed=args.seed)
    raw0 = sample_initial(args.images, args.num_gaussians, generator=torch.Generator().manual_seed(args.seed))
    # start each Gaussian with the colour of the pixel under its centre, small enough to refine
    g0 = decode(raw0)
    idx = ((g0.means + 1) / 2 * args.size).long().clamp(0, args.size - 1)
    g0.colors = torch.stack([images[b, :, idx[b, :, 1], idx[b, :, 0]].T for b in range(args.images)])
    g0.scales = torch.full_like(g0.scales, 1.5 / args.num_gaussians ** 0.5)
    raw = encode(g0).requires_grad_()
    opt = torch.optim.Adam([raw], lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    start = time.perf_counter()
    for _ in tqdm(range(args.iters), desc=f"fitting {args.images} images x {args.num_gaussians} Gaussians",
                  disable=args.quiet):
        out = render(decode(raw), height=args.size, width=args.size)
        loss = reconstruction_loss(out, images, "mse", dssim_weight=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        g = decode(raw)
        out = render(g, height=args.size, width=args.size).clamp(0, 1)
        p, s = psnr(out, images), ssim(out, images)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    save_gaussians(outdir / "gaussians.safetensors", g, labels=labels,
                   metadata={"height": str(args.size), "width": str(args.size), "source": "gvit demo shapes"})
    grid = torch.cat([torch.cat([images[i], out[i]], dim=2) for i in range(args.images)], dim=1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.NEAREST).save(
        outdir / "reconstructions.png")
    lines = ["| image | class | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    lines += [f"| {i} | {SHAPE_CLASSES[labels[i]]} | {p[i]:.2f} | {s[i]:.4f} |" for i in range(args.images)]
    summary = (f"{args.images} shape images ({args.size}x{args.size}), {args.num_gaussians} Gaussians each, "
               f"{args.iters} Adam steps in {seconds:.1f} s: mean PSNR {p.mean():.2f} dB, SSIM {s.mean():.4f}")
    (outdir / "report.md").write_text("# gvit demo\n\n" + summary + "\n\n" + "\n".join(lines) + "\n")
    print(summary)
    print(f"wrote {outdir / 'reconstructions.png'} (left: image, right: Gaussians), "
          f"{outdir / 'gaussians.safetensors'}, {outdir / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvit", description="Vision on 2D Gaussians.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit Gaussians to the built-in shapes images and write a report")
    demo.add_argument("--images", type=int, default=8)
    demo.add_argument("--size", type=int, default=32)
    demo.add_argument("--num-gaussians", type=int, default=128)
    demo.add_argument("--iters", type=int, default=300)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("images", "size", "num_gaussians", "iters"):
        if getattr(args, name, 1) < 1:
            print(f"gvit: error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
