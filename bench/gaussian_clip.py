"""GaussianVision's recognition half end to end, with the no-stage-1 ablation, on one dataset.

Stage 0 trains an RGB CLIP on captioned pixels (``model=clip``); ``gvit fit-dataset`` fits the train
and test splits (``mode=sum``, structured grid initialisation); stage 1 distils the CLIP into a splat
stem (``model=splat_distill``); stage 2 aligns from the stage-1 student and, for the ablation, from a
new stem (``model=splat_align``), with the same steps. Every part lives in ``--runs`` and is reused
when finished (resumed when interrupted). Prints the teacher-student cosine and zero-shot top-1
relative to the RGB teacher, with the compression of the Gaussians against 8-bit pixels; then
``gvit vl-eval`` over every variant (retrieval, held-out attribute pairs, kNN, linear probe).

The compression sweep: ``--sweep-k`` fits and trains stages 1 and 2 again for each further k, and
``--prune-tau`` adds the main k fitted with luminance-aware pruning; each variant's stage-2 student
is evaluated on its own test Gaussians.

    python bench/gaussian_clip.py                                   # the built-in captioned shapes
    python bench/gaussian_clip.py --data ../shared/data/cifar10 --steps 3000 --fit-limit 10000 \
        --num-gaussians 32 --sweep-k 16 64 --prune-tau 0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes")
    p.add_argument("--runs", default="runs/gaussian_clip")
    p.add_argument("--steps", type=int, default=1000, help="steps of each training stage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-gaussians", type=int, default=64)
    p.add_argument("--iters", type=int, default=200, help="fitting iterations per image")
    p.add_argument("--fit-limit", type=int, default=None, help="fit only this many training images")
    p.add_argument("--prompt", default=None, help="class prompt (default for the shapes: an ensemble of 'a <size> "
                                                   "<colour> {}' over the caption words; the config's otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-k", type=int, nargs="*", default=[], help="further k for the compression sweep")
    p.add_argument("--prune-tau", type=float, default=None, help="also the main k with pruning at this tau")
    a = p.parse_args()

    import torch

    from gvit.data.captions import COLOR_NAMES
    from gvit.data.shards import read_manifest
    from gvit.fit import FitConfig
    from gvit.tools.fit_dataset import fit_dataset
    from gvit.tools.vl_eval import vl_eval
    from gvit.train import load_config, train_or_reuse

    runs = Path(a.runs)
    quiet = dict(progress=False, log=lambda *_: None)
    shape_prompt = " | ".join(f"a {size} {color} {{}}" for size in ("small", "large") for color in COLOR_NAMES)
    prompt = a.prompt or (shape_prompt if a.data.startswith("shapes") else None)
    common = [f"steps={a.steps}", f"batch_size={a.batch_size}", f"seed={a.seed}", "limit_eval=2000"]
    teacher_cfg = load_config(None, ["model=clip", f"data={a.data}", *common, *([f"prompt={prompt}"] if prompt else []),
                                     f"out={runs / 'stage0_clip'}"])
    teacher = train_or_reuse(teacher_cfg, **quiet)
    print(f"stage 0 (RGB CLIP): zero-shot {100 * teacher.get('top1', float('nan')):.1f}%, "
          f"i2t R@1 {100 * teacher['i2t_r1']:.1f}%, {teacher['train_seconds']:.0f} s", flush=True)

    # the Gaussians of the captioned images themselves (the built-in shapes: their captioned version)
    images = f"captioned-{a.data}" if a.data.partition(":")[0] == "shapes" else a.data
    ckpt = str(runs / "stage0_clip" / "checkpoint.pt")

    def variant(k: int, prune_tau: float | None) -> tuple[dict, Path]:
        """Fit train and test with k (and pruning), train stage 1 and stage 2 on them."""
        name = f"k{k}" + (f"_prune{prune_tau:g}" if prune_tau is not None else "")
        fit = FitConfig(num_gaussians=k, iters=a.iters, mode="sum", prune_tau=prune_tau)
        folders = {}
        for split, limit in (("train", a.fit_limit), ("test", 2000)):
            folders[split] = runs / f"gaussians_{name}_{split}"
            if not (folders[split] / "manifest.json").is_file():
                fit_dataset(images, folders[split], fit, split=split, limit=limit, **quiet)
        manifest = read_manifest(folders["test"])
        print(f"Gaussians {name}: {a.iters} iterations, test PSNR {manifest['mean_psnr']:.2f} dB, mean count "
              f"{manifest['mean_count']:.1f}, {manifest['compression_vs_8bit']:.2f}x vs 8-bit pixels", flush=True)
        gauss = [f"teacher={ckpt}", f"offline_train={folders['train']}", f"offline_eval={folders['test']}", *common]
        rows = {"stage 1 (distill)": train_or_reuse(load_config(None, ["model=splat_distill", *gauss,
                                                                       f"out={runs / name / 'stage1'}"]), **quiet)}
        stage1 = str(runs / name / "stage1" / "checkpoint.pt")
        rows["stage 1 + stage 2"] = train_or_reuse(load_config(None, ["model=splat_align", *gauss, f"stage1={stage1}",
                                                                      f"out={runs / name / 'stage2'}"]), **quiet)
        return rows, folders["test"]

    rows, main_test = variant(a.num_gaussians, None)
    gauss = [f"teacher={ckpt}", f"offline_train={runs / f'gaussians_k{a.num_gaussians}_train'}",
             f"offline_eval={main_test}", *common]
    rows["stage 2 without stage 1"] = train_or_reuse(load_config(None, ["model=splat_align", *gauss,
                                                                        f"out={runs / 'stage2_only'}"]), **quiet)
    sweep = [(runs / f"k{a.num_gaussians}" / "stage2" / "checkpoint.pt", main_test)]
    for k, tau in [(k, None) for k in a.sweep_k] + ([(a.num_gaussians, a.prune_tau)] if a.prune_tau is not None else []):
        _, test = variant(k, tau)
        name = test.name.removeprefix("gaussians_").removesuffix("_test")
        sweep.append((runs / name / "stage2" / "checkpoint.pt", test))
    print(f"\n{a.data}: {a.steps} steps of batch {a.batch_size} per stage, seed {a.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | teacher-student cosine | zero-shot top-1 % | relative to the RGB teacher | trainable % | train s |")
    print("|---|---|---|---|---|---|")
    print(f"| RGB teacher (stage 0) | 1 | {100 * teacher['top1']:.1f} | 1 | 100 | {teacher['train_seconds']:.0f} |")
    for name, r in rows.items():
        print(f"| {name} | {r['cosine']:.3f} | {100 * r['top1']:.1f} | {r['top1_ratio']:.2f} "
              f"| {100 * r['trainable_fraction']:.1f} | {r['train_seconds']:.0f} |")
    checkpoints, tests = zip(*sweep)
    vl_eval(list(checkpoints), list(tests), runs / "vl_eval", **quiet)
    print("\nstage 1 + stage 2 of every variant (gvit vl-eval):\n")
    print((runs / "vl_eval" / "vl_eval.md").read_text().split("\n\n", 2)[2])


if __name__ == "__main__":
    main()
