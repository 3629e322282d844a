"""GaussianToken (B) against plain VQ (A) at equal tokens, its fixed-geometry (C) and bits-fair (D)
ablations, and A with 4x the tokens at D's bits; seeds, then one table, from one commit.

Every variant trains the same settings (``configs/cifar10_tokenizer_cpu.yaml`` by default: 64 tokens,
1,024 codes, the same CNN encoder and decoder, steps, batch and losses), differing only in
``tokenizer`` (and ``num_tokens`` for the larger A) and in the learning rate each got on val; through
``gvit train``'s own code; each run lives in ``--runs``/NAME-sSEED, so an interrupted table resumes (a
finished run is read back, a started one resumed from its checkpoint). The table comes from one commit:
``--runs`` records the commit its first run was made with and refuses runs from another (run a later
part of the table from a worktree of that commit: ``git worktree add DIR COMMIT``, then
``PYTHONPATH=DIR python DIR/bench/tokenizer.py --runs ...``), and a checkout with uncommitted changes
under gvit/, bench/ or configs/ is refused. Prints PSNR, SSIM and L1 on the test split, codebook usage
and perplexity over it, bits per image, map coverage and training seconds, as mean +- std over seeds.

    python bench/tokenizer.py                                           # A, B, C, D, A-256, seeds 0 1
    python bench/tokenizer.py --runs /tmp/tok --any-code steps=200      # a quick look
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _util import code_version, spread

# name -> (overrides, what it is). Learning rates chosen on val, three trials each (1,000 val images
# carved from the training images, 300 steps, seed 0; docs/results/gaussiantoken.md): A 1e-3 22.75 dB,
# 2e-3 23.03, 5e-4 22.12; B 1e-3 20.88, 2e-3 22.17, 5e-4 20.20. C and D are B's ablations and train at
# B's rate. A-256's three trials have not run yet: it trains at the shared 1e-3 until they have.
A256_LR = "1e-3"
VARIANTS = {
    "A": (["tokenizer=vq", "base_lr=2e-3"], "plain VQ, 64 tokens on the 8x8 grid, from B's query head at fixed "
          "grid centres"),
    "B": (["tokenizer=gaussian", "base_lr=2e-3"], "GaussianToken, 64 Gaussian tokens (geometry as float32)"),
    "C": (["tokenizer=gaussian_fixed", "base_lr=2e-3"], "B with fixed geometry (8x8 grid, half-cell scales, "
          "angle 0)"),
    "D": (["tokenizer=gaussian_bits", "base_lr=2e-3"], "B with the geometry quantised to geometry_bits bits per "
          "value"),
    "A-256": (["tokenizer=vq", "num_tokens=256", f"base_lr={A256_LR}"], "plain VQ, 256 tokens on the 16x16 grid"),
    "A-conv": (["tokenizer=vq_conv", "base_lr=2e-3"], "the first plain VQ: 64 tokens from one strided convolution "
               "(at A's rate; not in the default table)"),
}
TABLE = ["A", "B", "C", "D", "A-256"]


def pin_code(runs: Path, any_code: bool) -> str:
    """The commit this table comes from: this checkout's, which must be clean and the one ``runs``
    recorded first (see the module docstring); exits with one line otherwise."""
    import gvit

    root = Path(__file__).resolve().parent.parent
    if root not in Path(gvit.__file__).resolve().parents:
        raise SystemExit(f"gvit is imported from {Path(gvit.__file__).parent}, not from this checkout ({root}): "
                         f"run with PYTHONPATH={root}")
    version = code_version(root)
    if any_code:
        return version
    if version.endswith("+changes"):
        raise SystemExit("bench/tokenizer.py: the table comes from one commit; commit the changes under gvit/, "
                         "bench/ and configs/ first (or pass --any-code for a quick look)")
    record = runs / "code.txt"
    if record.is_file() and record.read_text().strip() != version:
        raise SystemExit(f"{runs} holds runs of commit {record.read_text().strip()}, this checkout is {version}: "
                         f"pass another --runs, or run from a worktree of that commit")
    runs.mkdir(parents=True, exist_ok=True)
    record.write_text(version + "\n")
    return version


def run(config: str, out: Path, overrides: list[str]) -> dict:
    """One finished run's result.json: read back, resumed, or trained from the start."""
    from gvit.train import load_config, train_or_reuse

    return train_or_reuse(load_config(config, [*overrides, f"out={out}"]), progress=False, log=lambda *_: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings on top of --config's, for every variant")
    p.add_argument("--config", default="configs/cifar10_tokenizer_cpu.yaml")
    p.add_argument("--runs", default="runs/tokenizer_table", help="folder of the runs (NAME-sSEED each)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--variants", nargs="*", default=TABLE, choices=list(VARIANTS))
    p.add_argument("--any-code", action="store_true", help="allow a checkout with uncommitted changes and runs of "
                   "another commit (a quick look, not a table)")
    a = p.parse_args()
    version = pin_code(Path(a.runs), a.any_code)

    import torch

    from gvit.train import load_config

    results: dict[str, list[dict]] = {}
    for name in a.variants:
        extra, _ = VARIANTS[name]
        for seed in a.seeds:
            r = run(a.config, Path(a.runs) / f"{name}-s{seed}", [*a.overrides, *extra, f"seed={seed}"])
            results.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, usage {100 * r['usage']:.1f}%, "
                  f"perplexity {r['perplexity']:.0f}, {r['train_seconds']:.0f} s", flush=True)

    cfg = load_config(a.config, a.overrides)
    print(f"\n{cfg.data}: {cfg.steps} steps of batch {cfg.batch_size}, {cfg.codebook_size} codes of {cfg.code_dim} "
          f"values, geometry_bits {cfg.geometry_bits}; evaluated on {results[a.variants[0]][0]['eval_images']} test "
          f"images; code {version}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
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
