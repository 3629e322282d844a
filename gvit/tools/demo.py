"""``gvit demo`` (train a small GViT on the built-in shapes and write its report) and ``gvit fit-demo``
(fit Gaussians to a few shapes images).

The demo's settings (:data:`DEMO_SETTINGS`) are the CPU recipe scaled to a few minutes on two
cores; any :class:`gvit.train.TrainConfig` key can be overridden. The run lives in ``<out>/run``
(checkpoint, metrics.jsonl), the report in ``<out>`` (:func:`gvit.tools.report.training_report`).
An interrupted demo continues where it stopped when run again with ``resume=True``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data import SHAPE_CLASSES, make_shapes
from ..files import write_text
from ..fit import FitConfig, fit_gaussians
from ..gaussians import save_gaussians
from ..settings import apply_overrides, from_mapping
from ..train import TrainConfig, train
from ..viz import draw_ellipses, save_png, to_uint8
from .artifacts import markdown_table
from .report import training_report

__all__ = ["DEMO_SETTINGS", "run_demo", "run_fit_demo"]

DEMO_SETTINGS = {
    "data": "shapes:8192",
    "limit_eval": 512,
    "model": "gvit",
    "encoder_size": "micro",
    "classifier_size": "micro",
    "patch": 4,
    "num_gaussians": 64,
    "g0_layout": "stratified",
    "sample_image": True,
    "pixel_loss": "bce",
    "steps": 600,
    "batch_size": 64,
    "base_lr": 4e-3,
    "log_every": 20,
    "checkpoint_every": 100,
}


def demo_config(out: str | Path = "runs/demo", overrides: list[str] | None = None) -> TrainConfig:
    """:data:`DEMO_SETTINGS` with ``key=value`` overrides, training into ``<out>/run``."""
    cfg = apply_overrides(from_mapping(TrainConfig, DEMO_SETTINGS, where="demo settings"), overrides)
    return replace(cfg, out=str(Path(out) / "run"))


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, *, resume: bool = False,
             progress: bool = True, log=print) -> dict:
    """Train per :data:`DEMO_SETTINGS` (+ ``key=value`` overrides), then write the report."""
    out = Path(out)
    cfg = demo_config(out, overrides)
    resume = resume and (out / "run" / "checkpoint.pt").is_file()
    result = train(cfg, resume=resume, progress=progress, log=log)
    if not result.get("finished"):
        return result
    summary = training_report(out / "run" / "checkpoint.pt", out)
    summary["train_seconds"] = result["train_seconds"]
    return summary


def run_fit_demo(out: str | Path, config: FitConfig, *, images: int = 8, size: int = 32, seed: int = 0,
                 progress: bool = True) -> str:
    """Fit ``config`` to ``images`` built-in shapes images; writes ``reconstructions.png`` (image |
    Gaussians | 2-sigma ellipses), ``gaussians.safetensors`` and ``report.md``. Returns the summary line."""
    for name, value in (("images", images), ("size", size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    pixels, labels, _ = make_shapes(images, size, seed=seed)
    res = fit_gaussians(pixels, config, progress=progress)
    outdir = Path(out)
    save_gaussians(outdir / "gaussians.safetensors", res.gaussians, labels=labels,
                   metadata={"height": str(size), "width": str(size), "source": "gvit demo shapes"})
    rows, s = [], 8
    for i in range(images):
        overlay = torch.tensor(draw_ellipses(pixels[i], res.gaussians[i], scale=s)).permute(2, 0, 1) / 255
        big = [x.repeat_interleave(s, 1).repeat_interleave(s, 2) for x in (pixels[i], res.rendered[i])]
        rows.append(torch.cat([*big, overlay], dim=2))
    save_png(outdir / "reconstructions.png", to_uint8(torch.cat(rows, dim=1)))
    p, q = res.psnr, res.ssim
    table = markdown_table(["image", "class", "PSNR (dB)", "SSIM"],
                           [[i, SHAPE_CLASSES[labels[i]], f"{p[i]:.2f}", f"{q[i]:.4f}"] for i in range(images)])
    summary = (f"{images} shape images ({size}x{size}), {config.num_gaussians} Gaussians each "
               f"({config.init} init), {config.iters} Adam steps in {res.seconds:.1f} s: mean PSNR {p.mean():.2f} dB, "
               f"SSIM {q.mean():.4f}")
    write_text(outdir / "report.md", "# gvit fit-demo\n\n" + summary + "\n\n" + table)
    return summary
