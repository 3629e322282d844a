"""GaussianToken (B) against plain VQ (A) at equal tokens, its fixed-geometry (C) and bits-fair (D)
ablations, and A with 4x the tokens at D's bits; seeds, then one table.

Every variant trains the same settings (``configs/cifar10_tokenizer_cpu.yaml`` by default: 64 tokens,
1,024 codes, the same CNN encoder and decoder, steps, batch and losses), differing only in
``tokenizer`` (and ``num_tokens`` for the larger A), through ``gvit train``'s own code; each run lives in
``--runs``/NAME-sSEED, so an interrupted table resumes (a finished run is read back, a started one
resumed from its checkpoint). Prints PSNR, SSIM and L1 on the test split, codebook usage and
perplexity over it, bits per image, map coverage and training seconds, as mean +- std over seeds.

    python bench/tokenizer.py                                   # A-D seeds 0 1; A-256, A-conv seed 0
    python bench/tokenizer.py --runs /tmp/tok steps=200         # a quick look
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _util import spread

# name -> (overrides, what it is)
VARIANTS = {
    # A's learning rate chosen on val (1,000 val images, 300 steps: 1e-3 22.75 dB, 2e-3 23.03, 5e-4 22.12),
    # two trials as B's head got two (dense or deformable attention, the scales' start); docs/results/gaussiantoken.md
    "A": (["tokenizer=vq", "base_lr=2e-3"], "plain VQ, 64 tokens on the 8x8 grid, from B's query head at fixed "
          "grid centres; its lr tuned on val"),
    "B": (["tokenizer=gaussian"], "GaussianToken, 64 Gaussian tokens (geometry as float32)"),
    "C": (["tokenizer=gaussian_fixed"], "B with fixed geometry (8x8 grid, half-cell scales, angle 0)"),
    "D": (["tokenizer=gaussian_bits"], "B with the geometry quantised to geometry_bits bits per value"),
    "A-256": (["tokenizer=vq", "num_tokens=256"], "plain VQ, 256 tokens on the 16x16 grid"),
    "A-conv": (["tokenizer=vq_conv"], "the first plain VQ: 64 tokens from one strided convolution"),
}


def run(config: str, out: Path, overrides: list[str]) -> dict:
    """One finished run's result.json: read back, resumed, or trained from the start."""
    from gvit.train import load_config, train_or_reuse

    return train_or_reuse(load_config(config, [*overrides, f"out={out}"]), progress=False, log=lambda *_: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings on top of --config's, for every variant")
    p.add_argument("--config", default="configs/cifar10_tokenizer_cpu.yaml")
    p.add_argument("--runs", default="runs/tokenizer_table", help="folder of the runs (NAME-sSEED each)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="seeds of A, B, C and D")
    p.add_argument("--seeds-others", type=int, nargs="*", default=[0], help="seeds of A-256 and A-conv")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args()

    import torch

    from gvit.train import load_config

    results: dict[str, list[dict]] = {}
    for name in a.variants:
        extra, _ = VARIANTS[name]
        for seed in a.seeds if name in ("A", "B", "C", "D") else a.seeds_others:
            r = run(a.config, Path(a.runs) / f"{name}-s{seed}", [*a.overrides, *extra, f"seed={seed}"])
            results.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, usage {100 * r['usage']:.1f}%, "
                  f"perplexity {r['perplexity']:.0f}, {r['train_seconds']:.0f} s", flush=True)

    cfg = load_config(a.config, a.overrides)
    print(f"\n{cfg.data}: {cfg.steps} steps of batch {cfg.batch_size}, {cfg.codebook_size} codes of {cfg.code_dim} "
          f"values, geometry_bits {cfg.geometry_bits}; evaluated on {results[a.variants[0]][0]['eval_images']} test "
          f"images; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| variant | what | seeds | PSNR (dB) | SSIM | L1 | codebook usage % | perplexity | bits per image "
          "| map coverage % | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {VARIANTS[name][1]} | {len(rs)} | {spread([r['psnr'] for r in rs])} "
              f"| {spread([r['ssim'] for r in rs], digits=4)} | {spread([r['l1'] for r in rs], digits=4)} "
              f"| {spread([r['usage'] for r in rs], 100, 1)} | {spread([r['perplexity'] for r in rs], digits=0)} "
              f"| {rs[0]['bits_per_image']:.0f} | {spread([r['coverage'] for r in rs], 100, 1)} "
              f"| {statistics.mean(r['train_seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
