"""Training benchmark: seconds per optimisation step of the patch ViT and of GViT in each phase.

Same width and depth for every model (``--size``), batch ``--batch`` of 32x32 images, k Gaussians,
synthetic inputs (the loader is not what is measured). Each case runs in a fresh process; the
table gives the best of ``--repeats`` steps after warm-up and the ratio to the patch ViT step.

    python bench/train.py                       # tiny, batch 128, k = 64
    python bench/train.py --size micro --batch 64
"""

from __future__ import annotations

import argparse
import json
import time

from _util import peak_rss_mb, rss_mb, run_child

CASES = ("patch_vit", "gvit:encoder", "gvit:joint", "gvit:guidance")


def measure(case: str, size: str, batch: int, k: int, repeats: int) -> dict:
    import torch

    from gvit.guidance import Phase, Phases
    from gvit.train import TrainConfig, _train_step, build_models

    model, _, phase_name = case.partition(":")
    cfg = TrainConfig(model=model, encoder_size=size, classifier_size=size, batch_size=batch, num_gaussians=k,
                      steps=1000, image_size=32, patch=4)
    run = build_models(cfg, 10, torch.device("cpu"))
    images = torch.rand(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))

    class Fixed(Phases):
        def at(self, step, total):  # every step in the phase being measured
            return {"encoder": Phase("encoder", True, False, 0.1, 0.0, False),
                    "joint": Phase("joint", True, True, 0.1, 1.0, False),
                    "guidance": Phase("guidance", True, False, 0.1, 1.0, True)}[phase_name or "joint"]

    phases = Fixed()
    base = rss_mb()
    _train_step(cfg, run, phases, 0, images, labels, torch.device("cpu"), 0)  # warm-up (numba cache load)
    times = []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        _train_step(cfg, run, phases, step, images, labels, torch.device("cpu"), 0)
        times.append(time.perf_counter() - t0)
    return {"case": case, "seconds": min(times), "peak_mb": peak_rss_mb(base)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        case, size, batch, k, repeats = a.child
        print(json.dumps(measure(case, size, int(batch), int(k), int(repeats))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; size {a.size}, batch {a.batch}, 32x32, "
          f"k = {a.k}, patch 4; best of {a.repeats} steps\n")
    print("| model / phase | s / step | images/s | peak RSS (MB) | vs patch ViT |")
    print("|---|---|---|---|---|")
    rows = [run_child(__file__, [c, a.size, str(a.batch), str(a.k), str(a.repeats)]) for c in CASES]
    base = rows[0]["seconds"]
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.3f} | {a.batch / r['seconds']:.0f} | {r['peak_mb']:.0f} "
              f"| {r['seconds'] / base:.2f}x |")


if __name__ == "__main__":
    main()
