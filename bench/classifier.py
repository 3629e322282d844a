"""How fast a Gaussian classifier learns, by token features, on fitted and on learned Gaussians.

Each variant of :class:`gvit.models.GaussianClassifier` trains on the same Gaussians for the same
budget (``--steps`` steps of batch ``--batch``, AdamW, warm-up + cosine) with ``--seeds`` seeds,
and the table gives test top-1 (mean and standard deviation over the seeds) and seconds per run:

* ``raw``: a linear map of the raw 9 values (the paper's projection);
* ``splat``: an MLP on splat features (Fourier centre, log-covariance, colour, opacity);
* ``splat+nN``: splat features, then two EdgeConv layers over each Gaussian's N nearest.

Fitted Gaussians come from ``gvit fit-dataset`` folders (``--train`` / ``--test``); with
``--checkpoint`` the same variants also train on the Gaussians a trained GViT's encoder gives for the
same images (the folders' dataset, read from their manifest). Runs one after the other in this
process; nothing else should run meanwhile.

    gvit fit-dataset --data shapes:8192 --split train --out sf/train --num-gaussians 64 --iters 100
    gvit fit-dataset --data shapes:8192 --split test --limit 512 --out sf/test --num-gaussians 64 --iters 100
    python bench/classifier.py --train sf/train --test sf/test [--checkpoint runs/demo/run/checkpoint.pt]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time


def train_and_test(variant: str, train, test, steps: int, batch: int, lr: float, size: str,
                   seed: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from gvit.models import GaussianClassifier

    (g_train, y_train), (g_test, y_test) = train, test
    torch.manual_seed(seed)
    features, _, neighbours = variant.partition("+n")
    model = GaussianClassifier(g_train.shape[1], int(max(y_train.max(), y_test.max())) + 1, size, features=features,
                               neighbours=int(neighbours or 0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / (0.05 * steps)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        i = torch.randint(len(g_train), (batch,), generator=gen)
        loss = F.cross_entropy(model(g_train[i]), y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        top1 = float((model(g_test).argmax(1) == y_test).float().mean())
    return top1, seconds


def fitted(folder: str):
    from gvit.data.shards import ShardDataset

    ds = ShardDataset(folder)
    if not bool(ds.valid.all()):
        raise SystemExit(f"{folder}: pruned Gaussian sets (valid masks) are not supported by this benchmark")
    return ds.raw, ds.targets


def learned(checkpoint: str, folder: str):
    import torch

    from gvit.data import open_dataset
    from gvit.data.shards import read_manifest, load_shards
    from gvit.train import load_gvit

    manifest = read_manifest(folder)
    _, labels, indices, _ = load_shards(folder)
    ds = open_dataset(manifest["settings"]["data"], manifest["settings"]["split"])
    images = torch.stack([ds[int(i)][0] for i in indices])
    model = load_gvit(checkpoint, job="bench/classifier.py").model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        chunks = [model.predict(images[i:i + 256], generator=gen) for i in range(0, len(images), 256)]
    psnr = float(torch.cat([c["psnr"] for c in chunks]).mean())
    return (torch.cat([c["g"] for c in chunks]), labels), psnr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="gvit fit-dataset folder of training Gaussians")
    p.add_argument("--test", required=True, help="gvit fit-dataset folder of test Gaussians")
    p.add_argument("--checkpoint", help="also train on this GViT's Gaussians of the same images")
    p.add_argument("--variants", nargs="*", default=["raw", "splat", "splat+n8"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", default="micro")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    a = p.parse_args()

    import torch

    from gvit.data.shards import read_manifest

    sources = [("fitted", fitted(a.train), fitted(a.test),
                f"{read_manifest(a.test).get('mean_psnr', float('nan')):.2f}")]
    if a.checkpoint:
        (train, _), (test, psnr) = learned(a.checkpoint, a.train), learned(a.checkpoint, a.test)
        sources.append(("learned", train, test, f"{psnr:.2f}"))
    k = sources[0][1][0].shape[1]
    print(f"{len(sources[0][1][1])} train / {len(sources[0][2][1])} test Gaussian sets, k = {k}; classifier "
          f"{a.size}, {a.steps} steps of batch {a.batch}, lr {a.lr}, seeds {a.seeds}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| Gaussians | test PSNR (dB) | tokens | top-1 % (mean +- std) | seconds per run |")
    print("|---|---|---|---|---|")
    for name, train, test, psnr in sources:
        for variant in a.variants:
            runs = [train_and_test(variant, train, test, a.steps, a.batch, a.lr, a.size, s) for s in a.seeds]
            accs = [100 * r[0] for r in runs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {name} | {psnr} | {variant} | {statistics.mean(accs):.1f} +- {spread:.1f} "
                  f"| {statistics.mean(r[1] for r in runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
