"""``gvit demo``: train a small GViT on the built-in shapes and write its report.

The settings (:data:`DEMO_SETTINGS`) are the CPU recipe scaled to a few minutes on two cores;
any :class:`gvit.train.TrainConfig` key can be overridden. The run lives in ``<out>/run``
(checkpoint, metrics.jsonl), the report in ``<out>`` (:func:`gvit.report.training_report`).
An interrupted demo continues where it stopped when run again with ``resume=True``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_SETTINGS", "run_demo"]

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


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, *, resume: bool = False,
             progress: bool = True, log=print) -> dict:
    """Train per :data:`DEMO_SETTINGS` (+ ``key=value`` overrides), then write the report."""
    from .report import training_report
    from .train import load_config, train

    out = Path(out)
    settings = [f"{k}={v}" for k, v in DEMO_SETTINGS.items()] + list(overrides or []) + [f"out={out / 'run'}"]
    cfg = load_config(None, settings)
    resume = resume and (out / "run" / "checkpoint.pt").is_file()
    result = train(cfg, resume=resume, progress=progress, log=log)
    if not result.get("finished"):
        return result
    summary = training_report(out / "run" / "checkpoint.pt", out)
    summary["train_seconds"] = result["train_seconds"]
    return summary
