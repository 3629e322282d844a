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
is evaluated on its own test Gaussians. ``--stem-ablation grid curve`` trains stage 1 again on the
main k with those poolings in place of the Perceiver resampler. With ``--jobs N`` the variants (fit,
stage 1, stage 2; the no-stage-1 ablation; the stem ablation) run as N processes side by side,
fitting while the teacher trains (on a GPU, where one small model leaves it mostly idle);
``--teacher-set`` passes settings to stage 0 alone (``clip_size=tiny base_lr=4e-3``), ``--set`` to
every stage (``num_workers=4`` on a GPU, where JPEG decoding bounds the teacher's steps).
Settings are chosen on a validation split: ``--val-every N --eval-split val`` carves every N-th
training image of each class out of the teacher's training set and the fitted training Gaussians,
fits that split instead of test and evaluates every stage on it; the test split is then read once
with the chosen settings (``--val-every N`` alone).

    python bench/gaussian_clip.py                                   # the built-in captioned shapes
    python bench/gaussian_clip.py --data ../shared/data/cifar10 --fit-limit 10000 --num-gaussians 32 \
        --sweep-k 8 16 --prune-tau 0.1 --stem-ablation grid \
        --teacher-set clip_size=tiny base_lr=2e-3 steps=3000 --set base_lr=4e-3   # CIFAR-10, ~85 min on 2 cores
    python bench/gaussian_clip.py --data ../shared/data/cifar10 --fit-limit 10000 --num-gaussians 32 \
        --teacher-set clip_size=tiny base_lr=2e-3 steps=3000 \
        --set base_lr=4e-3 captions=attributes unseen_classes=bird,cat,truck   # zero-shot on unseen classes
    python bench/gaussian_clip.py --data ../shared/data/cifar10 --fit-limit 10000 --num-gaussians 32 \
        --teacher-set clip_size=tiny base_lr=2e-3 steps=3000 --set base_lr=1e-3 \
        --val-every 25 --eval-split val --runs runs/gvl_val_lr1e-3   # a stage setting scored on val
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    p.add_argument("--stem-ablation", nargs="*", default=[], choices=("grid", "curve"),
                   help="also stage 1 with these stem poolings on the main k (against the Perceiver)")
    p.add_argument("--teacher-set", nargs="*", default=[], metavar="KEY=VALUE", help="settings of stage 0 alone")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings of every stage")
    p.add_argument("--val-every", type=int, default=0, help="carve a validation split from the training images "
                   "(every n-th of each class): the teacher and the Gaussians of every stage leave it out")
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="the split every stage is evaluated on (val, to choose settings: needs --val-every)")
    p.add_argument("--jobs", type=int, default=1, help="variants run side by side (fitting while the teacher trains)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # K[:TAU][@POOLING], run by --jobs
    a = p.parse_args()
    if a.eval_split == "val" and a.val_every < 1:
        p.error("--eval-split val needs --val-every N (N >= 1) to carve the validation split")

    import torch

    from gvit.data.captions import COLOR_NAMES
    from gvit.data.shards import read_manifest
    from gvit.fit import FitConfig
    from gvit.tools.fit_dataset import fit_dataset
    from gvit.tools.vl_eval import vl_eval
    from gvit.train import load_config, train_or_reuse

    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    variants = [(a.num_gaussians, None, "perceiver")] + [(k, None, "perceiver") for k in a.sweep_k]
    variants += [(a.num_gaussians, a.prune_tau, "perceiver")] if a.prune_tau is not None else []
    variants += [(a.num_gaussians, None, "none")]  # stage 2 without stage 1 ("none": no stage-1 stem)
    variants += [(a.num_gaussians, None, pooling) for pooling in a.stem_ablation]
    quiet = dict(progress=False, log=lambda *_: None)
    shape_prompt = " | ".join(f"a {size} {color} {{}}" for size in ("small", "large") for color in COLOR_NAMES)
    prompt = a.prompt or (shape_prompt if a.data.startswith("shapes") else None)
    common = [f"steps={a.steps}", f"batch_size={a.batch_size}", f"seed={a.seed}", "limit_eval=2000", *a.set]
    teacher_cfg = load_config(None, ["model=clip", f"data={a.data}", *common, *([f"prompt={prompt}"] if prompt else []),
                                     f"val_every={a.val_every}", f"eval_split={a.eval_split}",
                                     *a.teacher_set, f"out={runs / 'stage0_clip'}"])
    teacher_result = runs / "stage0_clip" / "result.json"
    side_by_side = None
    if a.variant is None:
        if a.jobs > 1:  # the variants fit their Gaussians while the teacher trains, then wait for it
            side_by_side = ThreadPoolExecutor(1).submit(run_side_by_side, variants, a.jobs, runs)
        failed = runs / "stage0_failed"
        failed.unlink(missing_ok=True)
        try:
            teacher = train_or_reuse(teacher_cfg, **quiet)
        except BaseException:
            failed.touch()  # the waiting variants give up
            raise
        print(f"stage 0 (RGB CLIP): zero-shot {100 * teacher.get('top1', float('nan')):.1f}%, "
              f"i2t R@1 {100 * teacher['i2t_r1']:.1f}%, {teacher['train_seconds']:.0f} s", flush=True)

    # the Gaussians of the captioned images themselves (the built-in shapes: their captioned version)
    images = f"captioned-{a.data}" if a.data.partition(":")[0] == "shapes" else a.data
    ckpt = str(runs / "stage0_clip" / "checkpoint.pt")

    def wait_for(path: Path) -> None:
        """A --variant process waits for what another one makes (the teacher, the main k's Gaussians)."""
        while not path.is_file():
            if (runs / "stage0_failed").is_file():
                raise SystemExit("the teacher's training failed")
            time.sleep(5)

    def variant(k: int, prune_tau: float | None, pooling: str = "perceiver") -> tuple[dict, Path]:
        """Fit train and the evaluated split with k (and pruning), train stage 1 and stage 2 on them. On the main k's
        Gaussians, ``pooling`` "none" trains stage 2 from a new stem (the no-stage-1 ablation), and
        grid or curve stage 1 with that pooling (the stem ablation)."""
        name = f"k{k}" + (f"_prune{prune_tau:g}" if prune_tau is not None else "")
        fit = FitConfig(num_gaussians=k, iters=a.iters, mode="sum", prune_tau=prune_tau)
        folders = {split: runs / f"gaussians_{name}_{split}" for split in ("train", a.eval_split)}
        for split, limit in (("train", a.fit_limit), (a.eval_split, 2000)):
            if pooling != "perceiver":
                wait_for(folders[split] / "manifest.json")
            elif not (folders[split] / "manifest.json").is_file():
                fit_dataset(images, folders[split], fit, split=split, val_every=a.val_every, limit=limit, **quiet)
        wait_for(teacher_result)
        evaluated = folders[a.eval_split]
        manifest = read_manifest(evaluated)
        print(f"Gaussians {name}: {a.iters} iterations, {a.eval_split} PSNR {manifest['mean_psnr']:.2f} dB, mean count "
              f"{manifest['mean_count']:.1f}, {manifest['compression_vs_8bit']:.2f}x vs 8-bit pixels", flush=True)
        gauss = [f"teacher={ckpt}", f"offline_train={folders['train']}", f"offline_eval={evaluated}", *common]
        if pooling == "none":  # the ablation: stage 2 from a new stem
            return {"stage 2 without stage 1": train_or_reuse(load_config(None, [
                "model=splat_align", *gauss, f"out={runs / 'stage2_only'}"]), **quiet)}, evaluated
        if pooling != "perceiver":
            return {f"stage 1, {pooling} pooling": train_or_reuse(load_config(None, [
                "model=splat_distill", *gauss, f"stem_pooling={pooling}", f"out={runs / f'{name}_{pooling}' / 'stage1'}"
            ]), **quiet)}, evaluated
        rows = {"stage 1 (distill)": train_or_reuse(load_config(None, ["model=splat_distill", *gauss,
                                                                       f"out={runs / name / 'stage1'}"]), **quiet)}
        stage1 = str(runs / name / "stage1" / "checkpoint.pt")
        rows["stage 1 + stage 2"] = train_or_reuse(load_config(None, ["model=splat_align", *gauss, f"stage1={stage1}",
                                                                      f"out={runs / name / 'stage2'}"]), **quiet)
        return rows, evaluated

    if a.variant is not None:  # one variant, in a process of its own
        spec, _, pooling = a.variant.partition("@")
        k, _, tau = spec.partition(":")
        variant(int(k), float(tau) if tau else None, pooling or "perceiver")
        return
    if side_by_side is not None:
        side_by_side.result()
    rows, main_evaluated = variant(*variants[0])
    sweep = [(runs / f"k{a.num_gaussians}" / "stage2" / "checkpoint.pt", main_evaluated)]
    for k, tau, pooling in variants[1:]:
        more, evaluated = variant(k, tau, pooling)
        if pooling != "perceiver":
            rows |= more
            continue
        name = evaluated.name.removeprefix("gaussians_").removesuffix(f"_{a.eval_split}")
        sweep.append((runs / name / "stage2" / "checkpoint.pt", evaluated))
    print(f"\n{a.data}: {a.steps} steps of batch {a.batch_size} per stage, seed {a.seed}, evaluated on "
          f"{a.eval_split}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]:.1f}" if key in r else "-"

    # top1: prompt classification over every class; with unseen_classes, top1_unseen is zero-shot on the
    # classes no training caption named (among them) and top1_seen the others (among theirs)
    print("| model | teacher-student cosine | top-1 with class prompts % | relative to the RGB teacher "
          "| unseen classes, zero-shot % | seen classes % | trainable % | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| RGB teacher (stage 0) | 1 | {pct(teacher, 'top1')} | 1 | {pct(teacher, 'top1_unseen')} "
          f"| {pct(teacher, 'top1_seen')} | 100 | {teacher['train_seconds']:.0f} |")
    for name, r in rows.items():
        print(f"| {name} | {r['cosine']:.3f} | {pct(r, 'top1')} | {r['top1_ratio']:.2f} | {pct(r, 'top1_unseen')} "
              f"| {pct(r, 'top1_seen')} | {100 * r['trainable_fraction']:.1f} | {r['train_seconds']:.0f} |")
    checkpoints, tests = zip(*sweep)
    vl_eval(list(checkpoints), list(tests), runs / "vl_eval", **quiet)
    print("\nstage 1 + stage 2 of every variant (gvit vl-eval):\n")
    print((runs / "vl_eval" / "vl_eval.md").read_text().split("\n\n", 2)[2])


def run_side_by_side(variants: list[tuple[int, float | None, str]], jobs: int, runs: Path) -> None:
    """Each variant in a process of its own (this script with ``--variant``), ``jobs`` at a time,
    the cores shared between them; a failure names its log."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))

    def one(v: tuple[int, float | None, str]) -> None:
        name = f"{v[0]}" + (f":{v[1]:g}" if v[1] is not None else "") + (f"@{v[2]}" if v[2] != "perceiver" else "")
        log = runs / f"variant_{name.replace(':', '_').replace('@', '_')}.log"
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", name], stdout=f,
                                  stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            raise RuntimeError(f"variant {name} failed (exit {done.returncode}); see {log}")

    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(one, v) for v in variants]:
            future.result()


if __name__ == "__main__":
    main()
