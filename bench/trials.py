"""Rows of settings over seeds, on ``gvit demo``'s settings (or ``--config``): the trials a recipe or a
baseline is chosen with, and the tables that report them.

Each row is a set of ``key=value`` overrides on top of the demo's settings and ``--common``; each runs
once per seed (seed sets the weights, data order, augmentation and g0), alone in this process. Every
run carves the validation split (``val_every``, 16 unless ``--common`` sets it) and is evaluated on it
(for a tokenizer, ``--config configs/cifar10_tokenizer_cpu.yaml``, PSNR and SSIM are then the val ones).
With ``--test`` it is also evaluated on the test split (the demo's 512 test images), for the rows of
a reported table; without it the test split is not read, as when choosing. ``--as-model patch_vit``
trains the patch ViT with the same data, steps and batch (the demo's patch ViT, ``DEMO_PATCH_VIT``
included; its own knobs in the rows). Prints one
table: mean +- std over the seeds of top-1 on val (and test), render PSNR, and for GViT runs with a
guidance phase what it did (mean centre shift of the encoder's Gaussians, share of their opacity on
the object before and after the phase, the guidance steps' mean learning rate as a share of the peak),
and the training seconds.

    python bench/trials.py --rows guidance=false gamma=0.025 gamma=0.05 gamma=0.1 gamma=0.2 --seeds 0 1 2 --test \
        --share-prefix
    python bench/trials.py --as-model patch_vit --rows "base_lr=8e-3" "base_lr=3.2e-2 crop_scale_min=0.5"
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _util import spread, train_until_stage

COLUMNS = [("val_top1", "val top-1 %", 100, 1), ("top1", "test top-1 %", 100, 1),
           ("train_top1", "train top-1 %", 100, 1), ("psnr", "PSNR (dB)", 1, 2),
           ("ssim", "SSIM", 1, 3),
           ("guidance_shift_px", "guidance shift (px)", 1, 3), ("object_share", "object share %", 100, 1),
           ("object_share_before_guidance", "share before guidance %", 100, 1),
           ("control_shift_px", "gamma-0 control shift (px)", 1, 3),
           ("control_top1", "gamma-0 control top-1 %", 100, 1),
           ("guidance_lr_share", "guidance lr / peak", 1, 2), ("train_seconds", "train s", 1, 0)]


# keys that act only from the joint stage on (the phases before it, their learning rates and each
# step's random draws do not read them)
TAIL_KEYS = {"gamma", "gamma_relative", "guidance", "guidance_lr", "guidance_every", "guidance_from", "lambda_cls",
             "joint_lr", "measure_guidance", "guidance_control",
             "eval_split"}  # (the evaluated split: read after training only)
# the keys each stage a shared prefix can stop at lets rows differ in: from the classifier stage on, also
# the augmentation in Gaussian space, the classifier's stochastic depth (drawn in classifier steps only)
# and the test-time fitting steps (the encoder's own phase reconstructs without them)
STAGE_KEYS = {"joint": TAIL_KEYS,
              "classifier": TAIL_KEYS | {"gaussian_crop_min", "token_drop", "color_jitter", "gaussian_noise",
                                         "drop_path", "fit_steps"}}


def train_from_shared_prefix(cfg, prefix: Path, stage: str = "joint") -> dict:
    """Train ``cfg`` by continuing a copy of the run ``prefix`` holds, stopped where ``stage`` (``joint``
    or ``classifier``) begins (trained first when missing): every step before it is the same whatever
    the stage's :data:`STAGE_KEYS` say, so the result is the one a run from scratch gives (tested on a
    small run), at the cost of the steps from the stage on."""
    import shutil

    from gvit.train import load_checkpoint, make_config, save_checkpoint, train

    start_cfg = make_config(**{**cfg.to_dict(), "out": str(prefix)})
    start = train_until_stage(start_cfg, stage)
    state = load_checkpoint(prefix / "checkpoint.pt")
    changed = {k for k, v in cfg.to_dict().items() if k != "out" and state["config"].get(k) != v}
    if state["step"] != start or not changed <= STAGE_KEYS[stage]:
        raise ValueError(f"--share-prefix: the rows differ in {sorted(changed - STAGE_KEYS[stage])}, which the "
                         f"steps before the {stage} stage read")
    out = Path(cfg.out)
    shutil.copytree(prefix, out)
    state["config"] = cfg.to_dict()
    save_checkpoint(out / "checkpoint.pt", state)
    marker = json.loads((out / ".gvit.json").read_text())
    marker["settings"] = {k: v for k, v in cfg.to_dict().items() if k != "out"}
    (out / ".gvit.json").write_text(json.dumps(marker))
    return train(cfg, resume=True, progress=False, log=lambda *_: None)


def chosen_on(result: dict) -> float:
    """The val top-1 a trial is chosen on; a run that did not evaluate a val split is refused."""
    from gvit.train import val_top1

    value = val_top1(result)
    if value is None:
        raise SystemExit(f"trials: refusing a figure evaluated on {result.get('eval_split')!r}, not on val "
                         f"(a Gaussian folder needs val_every or a val folder as offline_eval)")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=[""], help="each a quoted list of key=value overrides ('' = as is)")
    p.add_argument("--common", nargs="*", default=[], help="key=value overrides shared by every row")
    p.add_argument("--config", help="a training config file instead of the demo's settings")
    p.add_argument("--as-model", default=None, help="train this model kind with the same data and budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--test", action="store_true", help="also evaluate on the test split (reported rows only)")
    p.add_argument("--share-prefix", nargs="?", const="joint", default=None, choices=sorted(STAGE_KEYS),
                   help="rows that differ only in keys that act from the joint stage on (TAIL_KEYS: gamma, "
                        "guidance, lambda_cls, ...) train the steps before it once per seed and continue from there; "
                        "'--share-prefix classifier': rows that differ also in the augmentation in Gaussian space, "
                        "drop_path or fit_steps share the steps before the classifier stage")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    a = p.parse_args()

    import torch

    from gvit.tools.demo import baseline_config, demo_config
    from gvit.train import as_kind, load_config, train, with_overrides

    common = list(a.common) if any(c.startswith("val_every=") for c in a.common) else ["val_every=16", *a.common]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        for i, row in enumerate(a.rows):
            for seed in a.seeds:
                out = root / f"row{i}-seed{seed}"
                shared = [*common, f"seed={seed}"]
                cfg = load_config(a.config, [*shared, f"out={out}"]) if a.config else demo_config(out, shared)
                if a.as_model:  # the baseline's own knobs go on after it took the run's data and budget
                    cfg = (as_kind(cfg, a.as_model, out=str(out / a.as_model)) if a.config or a.as_model != "patch_vit"
                           else baseline_config(cfg, out))  # the demo's patch ViT, its tuned settings included
                cfg = with_overrides(cfg, shlex.split(row))
                if not a.test:
                    cfg = replace(cfg, eval_split="val")
                t0 = time.perf_counter()
                if a.share_prefix:
                    name = "prefix" if a.share_prefix == "joint" else f"prefix-{a.share_prefix}"
                    result = train_from_shared_prefix(cfg, root / f"{name}-seed{seed}", a.share_prefix)
                else:
                    result = train(cfg, progress=False, log=lambda *_: None)
                if not a.test and "top1" in result:  # evaluated on val alone: its measures are the val ones
                    result = {**{k: v for k, v in result.items() if k != "top1"}, "val_top1": chosen_on(result)}
                results.setdefault(row, []).append(result)
                print(f"[{row or 'as is'}] seed {seed}: " + ", ".join(
                    f"{c[1]} {result[c[0]] * c[2]:.{c[3]}f}" for c in COLUMNS if result.get(c[0]) is not None)
                      + f" ({time.perf_counter() - t0:.0f} s in all)", flush=True)
                if a.keep:
                    with open(root / "results.jsonl", "a") as f:
                        f.write(json.dumps({"row": row, "seed": seed, **result}) + "\n")
    print(f"\n{cfg.model} on {cfg.data}: {cfg.steps} steps of batch {cfg.batch_size}; common {' '.join(common)}; "
          f"seeds {a.seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    shown = [c for c in COLUMNS if any(c[0] in r for rs in results.values() for r in rs)]
    print("| row | " + " | ".join(c[1] for c in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for row, rs in results.items():
        cells = [spread([r[c[0]] for r in rs if r.get(c[0]) is not None], c[2], c[3])
                 if any(r.get(c[0]) is not None for r in rs) else "-" for c in shown]
        print(f"| {row or 'as is'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
