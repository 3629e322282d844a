"""Training benchmark: step cost, and top-1 after an equal budget, of the patch ViT and GViT.

Step cost (default): seconds per optimisation step of the patch ViT and of GViT in each phase.
The CPU CIFAR-10 recipe (configs/cifar10_cpu.yaml) with the same width and depth for every model
(``--size``), batch ``--batch`` of 32x32 images, k Gaussians, synthetic inputs (the loader is not
what is measured). Each case runs in a fresh process; the table gives the best of ``--repeats``
steps after warm-up and the ratio to the patch ViT step.

    python bench/train.py                       # tiny, batch 128, k = 64
    python bench/train.py --size micro --batch 64

The demo's steps (``--demo``): ``gvit demo``'s own settings (gvit.tools.demo) on the shapes, the
patch ViT baseline and GViT in each of its phases, the cached classifier step included, and the
cost of caching (encoding and test-time fitting) 1,024 training images; ``--old-tree DIR`` times
the same cases with the gvit package of another checkout (a worktree of an earlier commit) in the
same run, for a before / after ratio.

    python bench/train.py --demo --repeats 20 --rounds 3 --old-tree /tmp/gvit-old

Accuracy (``--accuracy``): every variant of the paper's Table 1d / Fig. 3 trained with the CPU
CIFAR-10 recipe (configs/cifar10_cpu.yaml) for the same number of steps, each in its own
``gvit train`` process, evaluated on ``--limit-eval`` test images spread over the split: patch ViT, GViT
without guidance, GViT with guidance, learned queries, offline Gaussians (a classifier on
Gaussians fitted by ``gvit fit-dataset`` to ``--offline-images`` training images spread over the split), and
GViT with guidance for each k of ``--ks``. Finished variants are kept in ``--out`` and not rerun.

    python bench/train.py --accuracy --data ../shared/data/cifar10 --steps 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _util import case_config, peak_rss_mb, rss_mb, run_child

CASES = ("patch_vit", "gvit:encoder", "gvit:joint", "gvit:guidance")
DEMO_CASES = ("patch_vit", "gvit:encoder", "gvit:classifier", "gvit:joint", "gvit:guidance")
# every step of a timed demo case in one phase (its schedule's fractions chosen so)
DEMO_PHASES = {"encoder": ["classifier_from=1", "pretrain_until=1", "guidance_from=1"],
               "classifier": ["classifier_from=0", "pretrain_until=1", "guidance_from=1"],
               "joint": ["classifier_from=0", "pretrain_until=0", "guidance_from=1"],
               "guidance": ["classifier_from=0", "pretrain_until=0", "guidance_from=0", "guidance_every=1"]}
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "cifar10_cpu.yaml"


def measure(case: str, size: str, batch: int, k: int, repeats: int) -> dict:
    import torch

    from gvit.train import model_step

    cfg = case_config(RECIPE, case, [f"encoder_size={size}", f"classifier_size={size}", f"batch_size={batch}",
                                     f"num_gaussians={k}", "steps=1000", "image_size=32"])
    run = model_step(cfg, 10, "cpu")
    images = torch.rand(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    base = rss_mb()
    _, times = time_steps(run, cfg.seed, images, labels, repeats)
    return {"case": case, "seconds": min(times), "peak_mb": peak_rss_mb(base)}


def time_steps(run, seed: int, images, labels, repeats: int) -> tuple[float, list[float]]:
    """Seconds of a warm-up step (numba's cache load; a cache a phase builds) and of ``repeats``
    steps after it, of the model step ``run`` on one batch."""
    from gvit.train import step_generator

    times = []
    for step in range(repeats + 1):
        t0 = time.perf_counter()
        run.step(step, images, labels, step_generator(seed, step), 0, 1)
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def measure_demo(case: str, repeats: int) -> dict:
    """Seconds per step of one demo case (the median of ``repeats`` after a warm-up step: what a run
    of many steps gets, where the best step flatters a noisy machine); for the cached
    classifier phase also the seconds of encoding its 1,024 training images (the warm-up step)."""
    import torch

    from gvit.tools.demo import baseline_config, demo_config
    from gvit.train import model_step, with_overrides

    torch.manual_seed(0)
    cfg = demo_config("runs/unused")
    model, _, phase = case.partition(":")
    cfg = baseline_config(cfg) if model == "patch_vit" else with_overrides(cfg, DEMO_PHASES[phase])
    run = model_step(cfg, 6, "cpu")
    images = torch.rand(cfg.batch_size, 3, 32, 32)
    labels = torch.randint(0, 6, (cfg.batch_size,))
    if phase == "classifier":  # the cache: 1,024 synthetic training images through the frozen encoder
        pool = torch.utils.data.TensorDataset(torch.rand(1024, 3, 32, 32), torch.randint(0, 6, (1024,)))
        run.attach_training_set(pool, None)
    base = rss_mb()
    first, times = time_steps(run, cfg.seed, images, labels, repeats)
    median = statistics.median(times)
    out = {"case": case, "seconds": median, "peak_mb": peak_rss_mb(base)}
    return out | ({"cache_seconds": first - median} if phase == "classifier" else {})


def demo(a) -> None:
    import torch

    trees = {"this tree": None} | ({"old tree": a.old_tree} if a.old_tree else {})
    rounds: dict = {name: {case: [] for case in DEMO_CASES} for name in trees}
    for _ in range(a.rounds):  # the trees alternate case by case, so a drift in the machine's speed hits both
        for case in DEMO_CASES:
            for name, tree in trees.items():
                rounds[name][case].append(run_child(__file__, ["demo", case, str(a.repeats)], pythonpath=tree))
    results = {name: {case: {key: statistics.median(r[key] for r in runs) if key != "case" else case
                             for key in runs[0]} for case, runs in cases.items()} for name, cases in rounds.items()}
    print(f"gvit demo's settings, batch 64, 32x32, k = 64; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; the median step of {a.repeats} in each of {a.rounds} rounds, the median round\n")
    def rows(r: dict) -> list[tuple[str, float, int, str]]:  # (case, seconds, images, peak MB)
        steps = [(c, v["seconds"], 64, f"{v['peak_mb']:.0f}") for c, v in r.items()]
        return steps + [("caching 1,024 images (encoding + test-time fitting)", r["gvit:classifier"]["cache_seconds"],
                         1024, "-")]

    new, old = rows(results["this tree"]), rows(results["old tree"]) if a.old_tree else None
    base = results["this tree"]["patch_vit"]["seconds"]
    print("| case | seconds | images/s | peak RSS (MB) | vs patch ViT step |" + (" old tree seconds | new / old |"
                                                                              if old else ""))
    print("|---|---|---|---|---|" + ("---|---|" if old else ""))
    for i, (case, seconds, images, peak) in enumerate(new):
        ratio = f"{seconds / base:.2f}x" if images == 64 else "-"
        line = f"| {case} | {seconds:.4f} | {images / seconds:.0f} | {peak} | {ratio} |"
        print(line + (f" {old[i][1]:.4f} | {seconds / old[i][1]:.2f}x |" if old else ""))


def accuracy_variants(ks: list[int]) -> dict[str, list[str]]:
    """Variant name -> ``key=value`` overrides of the CPU recipe."""
    variants = {
        "patch ViT": ["--as-model=patch_vit"],
        "GViT, no guidance": ["guidance=false"],
        "GViT, guidance": [],
        "GViT, learned queries": ["learned_queries=true", "sample_image=false", "image_colors=false"],
        "offline Gaussians": ["--as-model=offline"],
        "GViT, guidance, paper's g0 input": ["g0_layout=uniform", "sample_image=false", "image_colors=false"],
    }
    for k in ks:
        if k != 64:
            variants[f"GViT, guidance, k={k}"] = [f"num_gaussians={k}"]
    return variants


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def accuracy(a) -> None:
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    common = [f"data={a.data}", f"steps={a.steps}", "epochs=null", f"limit_eval={a.limit_eval}",
              f"batch_size={a.batch}", "checkpoint_every=100"]
    rows = []
    for name, overrides in accuracy_variants(a.ks).items():
        out = root / _slug(name)
        if "--as-model=offline" in overrides:
            overrides = overrides + _offline_data(a, root)
        if not (out / "result.json").is_file():
            print(f"training {name} ...", file=sys.stderr, flush=True)
            resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
            subprocess.run([sys.executable, "-m", "gvit.cli", "train", "--config", str(RECIPE), *common, *overrides,
                            f"out={out}", "--quiet", *resume], check=True)
        rows.append((name, overrides, json.loads((out / "result.json").read_text())))
    base = rows[0][2]["top1"]
    print(f"CIFAR-10, {a.steps} steps of batch {a.batch} per variant (configs/cifar10_cpu.yaml), top-1 on the "
          f"{a.limit_eval} test images spread over the split\n")
    print("| variant | overrides | top-1 (%) | vs patch ViT | render PSNR (dB) | train s |")
    print("|---|---|---|---|---|---|")
    for name, overrides, r in rows:
        shown = " ".join(o for o in overrides if not o.startswith(("offline_train", "offline_eval"))) or "-"
        psnr = f"{r['psnr']:.1f}" if "psnr" in r else "-"
        print(f"| {name} | `{shown}` | {100 * r['top1']:.1f} | {r['top1'] / base:.2f} | {psnr} "
              f"| {r['train_seconds']:.0f} |")


def _offline_data(a, root: Path) -> list[str]:
    """Fit Gaussians (k = 64, the recipe's k) to the training subset and the evaluation images once."""
    folders = {}
    for split, limit in (("train", a.offline_images), ("test", a.limit_eval)):
        folder = root / f"offline_{split}"
        if not (folder / "manifest.json").is_file():
            print(f"fitting Gaussians to {limit} {split} images ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "gvit.cli", "fit-dataset", "--data", a.data, "--split", split,
                            "--out", str(folder), "--limit", str(limit), "--num-gaussians", "64", "--iters",
                            str(a.offline_iters), "--quiet"], check=True)
        folders[split] = folder
    return [f"offline_train={folders['train']}", f"offline_eval={folders['test']}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accuracy", action="store_true", help="train the variants and report top-1 instead")
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--limit-eval", type=int, default=2000)
    p.add_argument("--ks", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--offline-images", type=int, default=8192)
    p.add_argument("--offline-iters", type=int, default=200)
    p.add_argument("--out", default="runs/bench_accuracy")
    p.add_argument("--demo", action="store_true", help="the demo's step costs (gvit demo's settings) instead")
    p.add_argument("--rounds", type=int, default=1, help="with --demo: fresh processes per case, the median kept")
    p.add_argument("--old-tree", default=None, help="with --demo: also time another checkout's gvit (before / after)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.accuracy:
        accuracy(a)
        return
    if a.child and a.child[0] == "demo":
        print(json.dumps(measure_demo(a.child[1], int(a.child[2]))))
        return
    if a.demo:
        demo(a)
        return
    if a.child:
        case, size, batch, k, repeats = a.child
        print(json.dumps(measure(case, size, int(batch), int(k), int(repeats))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; size {a.size}, batch {a.batch}, 32x32, "
          f"k = {a.k}, other settings from {RECIPE.name}; best of {a.repeats} steps\n")
    print("| model / phase | s / step | images/s | peak RSS (MB) | vs patch ViT |")
    print("|---|---|---|---|---|")
    rows = [run_child(__file__, [c, a.size, str(a.batch), str(a.k), str(a.repeats)]) for c in CASES]
    base = rows[0]["seconds"]
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.3f} | {a.batch / r['seconds']:.0f} | {r['peak_mb']:.0f} "
              f"| {r['seconds'] / base:.2f}x |")


if __name__ == "__main__":
    main()
