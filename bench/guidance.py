"""Constructive guidance against none, over seeds, with what the guidance steps did.

Trains the same settings (``gvit demo``'s by default, or ``--config``) with ``guidance=true`` and
``guidance=false`` for each seed of ``--seeds`` (seed sets the weights, data order, augmentation and
g0), each run alone in this process, and prints top-1 and PSNR as mean +- standard deviation over the
seeds. For the guided runs it also averages what every guidance step logged to metrics.jsonl
(:meth:`gvit.train.gvit_step.GViTStep._guidance_step`): the norm of gamma * grad_cls against grad_rec
over the encoder's parameters and their cosine, how far the step moved the Gaussians' centres
(pixels), and the change of the batch's classification loss the step caused.

    python bench/guidance.py                          # demo settings, seeds 0 1 2
    python bench/guidance.py gamma=0.5 guidance_every=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _util import spread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings on top of the demo's (or --config's)")
    p.add_argument("--config", help="a training config file instead of the demo's settings")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    a = p.parse_args()

    import torch

    from gvit.tools.demo import demo_config
    from gvit.train import load_config, train

    rows, guided_steps = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for guidance in (False, True):
            for seed in a.seeds:
                out = Path(tmp) / f"g{int(guidance)}-s{seed}"
                extra = ["measure_guidance=true", *a.overrides, f"guidance={str(guidance).lower()}", f"seed={seed}"]
                # the demo's config trains into <its out>/run
                cfg = load_config(a.config, [*extra, f"out={out}"]) if a.config else demo_config(out, extra)
                result = train(cfg, progress=False, log=lambda *_: None)
                print(f"guidance={guidance} seed={seed}: top-1 {100 * result['top1']:.2f}%, PSNR "
                      f"{result['psnr']:.2f} dB, {result['train_seconds']:.0f} s", flush=True)
                rows.setdefault(guidance, []).append(result)
                if guidance:
                    lines = [json.loads(line) for line in open(Path(cfg.out) / "metrics.jsonl")]
                    guided_steps += [m for m in lines if m.get("phase") == "guidance"]
    print(f"\n{cfg.model} on {cfg.data}: {cfg.steps} steps of batch {cfg.batch_size}, guidance from "
          f"{cfg.guidance_from} every {cfg.guidance_every} steps, gamma {cfg.gamma}; seeds {a.seeds}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| run | top-1 % | PSNR (dB) | train seconds |")
    print("|---|---|---|---|")
    for guidance, results in rows.items():
        print(f"| {'guidance' if guidance else 'no guidance'} | {spread([r['top1'] for r in results], 100, 1)} "
              f"| {spread([r['psnr'] for r in results], digits=2)} "
              f"| {statistics.mean(r['train_seconds'] for r in results):.0f} |")
    if guided_steps:
        ratio = [m["guide_cls_norm"] / m["guide_rec_norm"] for m in guided_steps]
        print(f"\n{len(guided_steps)} guidance steps (all seeds), mean +- std per step:\n")
        print("| gamma * grad_cls / grad_rec (norms) | cosine | centre shift (px) | colour change "
              "| d loss_cls (after - before) | d loss_rec |")
        print("|---|---|---|---|---|---|")
        print(f"| {spread(ratio, digits=3)} | {spread([m['guide_cos'] for m in guided_steps], digits=3)} "
              f"| {spread([m['guide_shift_px'] for m in guided_steps], digits=4)} "
              f"| {spread([m['guide_color'] for m in guided_steps], digits=4)} "
              f"| {spread([m['guide_dloss_cls'] for m in guided_steps], digits=4)} "
              f"| {spread([m['guide_dloss_rec'] for m in guided_steps], digits=5)} |")


if __name__ == "__main__":
    main()
