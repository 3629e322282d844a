"""How well each Gaussian encoder carries the image, beside per-image fitting, in one run.

Trains each encoder on the reconstruction loss alone (MSE, Adam, warm-up + cosine) on the training
images and reports the PSNR of its renders on held-out val images (every ``--val-every``-th training
image of each class, left out of training; ``--eval-split test`` for a reported figure, read once), next
to the PSNR of the structured start (grid cells with their colours) and of per-image fitting with
``gvit.fit`` at the same k: encoders are compared, and chosen, on val. Every row runs in this process
one after the other; nothing else should run meanwhile.

    python bench/encoder.py                                   # built-in shapes, k = 64
    python bench/encoder.py --data ../shared/data/cifar10      # CIFAR-10 (32x32)
"""

from __future__ import annotations

import argparse
import math
import time


def train_encoder(model, images, steps: int, batch: int, lr: float, seed: int) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.encoder.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    size = images.shape[-1]
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        loss = F.mse_loss(model.reconstruct(model.encode(x, generator=gen), size, size), x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.encoder.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def eval_psnr(model, images) -> float:
    import torch

    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        values = [model.predict(images[i:i + 128], generator=gen)["psnr"] for i in range(0, len(images), 128)]
    model.train()
    return float(torch.cat(values).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--eval-split", choices=("val", "test"), default="val",
                   help="val (carved from train, what encoders are chosen on) or test (a reported figure)")
    p.add_argument("--val-every", type=int, default=16, help="every n-th training image of each class is val")
    p.add_argument("--size", default="tiny", help="encoder size (refine: width and heads per round)")
    p.add_argument("--fit-iters", type=int, nargs="*", default=[100, 200])
    p.add_argument("--encoders", nargs="*", default=["refine", "refine-nores", "denoise"],
                   help="refine, refine-nores (no residual input), refine-lq (learned queries), denoise")
    a = p.parse_args()

    import torch

    from gvit.data import open_dataset, spread_indices
    from gvit.fit import FitConfig, fit_gaussians, initialize
    from gvit.losses import psnr
    from gvit.models import GaussianClassifier, GaussianEncoder, GViT, RefinementEncoder
    from gvit.render import render
    from gvit.gaussians import decode

    def load(split, n):
        ds = open_dataset(a.data if a.data != "shapes" else f"shapes:{max(n, 1024)}", split, val_every=a.val_every)
        idx = spread_indices(len(ds), n)
        return torch.stack([ds[i][0] for i in idx])

    train, held_out = load("train", a.train_images), load(a.eval_split, a.eval_images)
    size = train.shape[-1]
    print(f"{a.data}: {len(train)} train / {len(held_out)} {a.eval_split} images ({size}x{size}), k = {a.k}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; encoders: {a.steps} steps of batch {a.batch}, "
          f"MSE, lr {a.lr}\n")
    print(f"| method | {a.eval_split} PSNR (dB) | seconds | note |")
    print("|---|---|---|---|")
    start = decode(initialize(held_out, a.k, "grid"))
    start_psnr = float(psnr(render(start, height=size, width=size).clamp(0, 1), held_out).mean())
    print(f"| grid start (cell colours, no learning) | {start_psnr:.2f} | - | the refiner's round-0 input |")
    for iters in a.fit_iters:
        t0 = time.perf_counter()
        res = fit_gaussians(held_out, FitConfig(num_gaussians=a.k, iters=iters), progress=False)
        print(f"| per-image fitting, {iters} iterations | {float(res.psnr.mean()):.2f} "
              f"| {time.perf_counter() - t0:.0f} "
              f"| {len(held_out) / (time.perf_counter() - t0):.1f} images/s |", flush=True)
    for name in a.encoders:
        torch.manual_seed(0)
        if name.startswith("refine"):
            encoder = RefinementEncoder(size, a.k, a.size, residual=name != "refine-nores",
                                        learned_queries=name == "refine-lq")
            layout = "grid"
        else:
            encoder = GaussianEncoder(size, 4, a.k, a.size, sample_image=True, image_colors=True)
            layout = "grid"
        model = GViT(encoder, GaussianClassifier(a.k, 2, "micro"), g0_layout=layout)
        params = sum(p.numel() for p in encoder.parameters())
        seconds = train_encoder(model, train, a.steps, a.batch, a.lr, seed=0)
        print(f"| encoder={name} ({a.size}, {params / 1e6:.2f} M parameters) | {eval_psnr(model, held_out):.2f} "
              f"| {seconds:.0f} | {a.steps * a.batch / seconds:.0f} train images/s |", flush=True)


if __name__ == "__main__":
    main()
