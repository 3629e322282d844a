"""Helpers shared by the benchmarks: run one measurement in a fresh process, peak memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb(since: float = 0.0) -> float:
    """Peak resident memory of this process in MiB, minus ``since`` (an earlier :func:`rss_mb`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - since


def run_child(script: str, args: list[str], pythonpath: str | None = None) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (with ``pythonpath`` first on its path: another
    checkout's gvit); its last stdout line is a JSON result."""
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": str(Path(pythonpath).resolve())}
    out = subprocess.run([sys.executable, script, "--child", *args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# every step of a timed GViT case is in one phase (the schedule's fractions chosen so)
PHASE_OVERRIDES = {"encoder": ["perceptual_from=0", "classifier_from=1", "guidance_from=1"],
                   "joint": ["perceptual_from=0", "classifier_from=0", "guidance_from=1"],
                   "guidance": ["perceptual_from=0", "classifier_from=0", "guidance_from=0", "guidance_every=1"]}


def case_config(recipe, case: str, overrides: list[str]):
    """The settings of a timed training case, ``patch_vit`` or ``gvit:<phase>``, from a GViT recipe."""
    from gvit.train import load_config

    model, _, phase = case.partition(":")
    if model == "gvit":
        return load_config(recipe, [*overrides, *PHASE_OVERRIDES[phase or "joint"]])
    shared = [o for o in overrides if o.partition("=")[0] in ("classifier_size", "batch_size", "steps", "image_size",
                                                              "device", "precision")]
    return load_config(recipe, shared, as_model=model)


def code_version(root: str | Path = ".") -> str:
    """The commit of the checkout at ``root`` (``git rev-parse HEAD``), with ``+changes`` when tracked
    files under gvit/, bench/ or configs/ differ from it: what a table that must come from one commit
    records."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", "HEAD").strip()
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "gvit", "bench", "configs").strip()
    return commit + ("+changes" if changed else "")


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean +- std`` over seeds (scaled, rounded); the mean alone for one value."""
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {statistics.stdev(values) * scale:.{digits}f}"


def stage_start(cfg, stage: str = "joint") -> int:
    """The first step of the GViT run ``cfg``'s ``joint`` stage (joint training, its guidance phase
    included) or ``classifier`` stage (the first step at which its classifier trains)."""
    schedule = cfg.schedule()
    return schedule.boundaries(cfg.steps)[-2] if stage == "joint" else schedule.classifier_start(cfg.steps)


def train_until_stage(cfg, stage: str = "joint") -> int:
    """:func:`stage_start` of ``cfg``; the run in ``cfg.out`` is trained up to it first when that folder
    holds no checkpoint, and continued up to it when its checkpoint is earlier (an interrupted prefix)."""
    from gvit.train import load_checkpoint, train

    start = stage_start(cfg, stage)
    checkpoint = Path(cfg.out) / "checkpoint.pt"
    done = load_checkpoint(checkpoint)["step"] if checkpoint.is_file() else 0
    if done < start:
        train(cfg, resume=done > 0, stop_after=start - done, progress=False, log=lambda *_: None)
    return start
