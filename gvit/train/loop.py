"""The training loop, evaluation, and loading a trained run (paper 2.2, Algorithm 1, Appendix A).

``train(cfg)`` runs ``cfg.steps`` optimisation steps of the run's model kind (:mod:`gvit.train.kinds`);
the loop never asks which kind it runs (GViT's phases live in its step).
Data parallel under torchrun: every rank takes its slice of each global batch and gradients are
averaged with one all-reduce per model before each optimiser step (a flat all-reduce rather than
the DistributedDataParallel wrapper, because a guidance step takes two separate gradients with
``torch.autograd.grad``, which DDP's hooks do not see). A run writes ``checkpoint.pt`` (atomic,
every ``checkpoint_every`` steps, on interrupt and at the end), ``metrics.jsonl`` and ``result.json``
into ``cfg.out``; ``resume`` continues from the checkpoint and ends bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..distributed import device_for, init_process_group, rank_world
from ..files import append_line, atomic_path, check_settings, output_folder, settings_diff, write_json
from ..progress import progress_bar
from .base import ModelStep
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import StepBatches, limit, split_name, step_generator
from .kinds import config_from_dict, kind_of, model_step, with_overrides

__all__ = ["train", "train_or_reuse", "evaluate", "evaluate_checkpoint", "load_trained", "load_gvit", "TrainedRun",
           "val_top1"]


def val_top1(result: dict) -> float | None:
    """The top-1 of a run's ``result`` measured on a val split, or None when it has none: its ``top1`` when
    the run evaluated val (``eval_split``), else its ``val_top1`` when that was measured on val
    (``val_eval_split``). What a chooser may choose on."""
    if result.get("eval_split") == "val":
        return result.get("top1")
    return result.get("val_top1") if result.get("val_eval_split") == "val" else None


def _device(cfg: TrainConfig) -> torch.device:
    return device_for(cfg.device, "config: device")


def _state(run: ModelStep, cfg: TrainConfig, step: int, bad_steps: int, classes: list[str]) -> dict:
    return {"step": step, "bad_steps": bad_steps, "config": cfg.to_dict(), "classes": list(classes)} | run.state_dict()


def _curve_sets(cfg: TrainConfig, step_kind, train_ds) -> dict:
    """The images ``eval_every`` measures: up to 512 of the val split and as many training images."""
    val = limit(step_kind.datasets(replace(cfg, eval_split="val"))[1], 512)
    return {"val": val, "train": limit(train_ds, len(val))}


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          progress: bool = True, log=print) -> dict:
    """Train per ``cfg``; returns the final evaluation (or a partial summary when ``stop_after``
    steps of this call ran first, as when a job is interrupted). ``resume`` continues from
    ``<out>/checkpoint.pt``. The run folder is claimed (:func:`gvit.files.output_folder`): a folder
    holding a run (finished or not) is refused unless ``resume`` or ``overwrite`` (start again), one
    holding other files or a run with other settings unless ``overwrite``."""
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", 0)) == 0:  # one claim per launch (torchrun's rank 0)
            settings = {k: v for k, v in cfg.to_dict().items() if k != "out"}
            stack.enter_context(output_folder(cfg.out, "train", settings=settings, resume=resume, overwrite=overwrite,
                                              what="out="))
        return _train(cfg, resume=resume, stop_after=stop_after, progress=progress, log=log)


def _train(cfg: TrainConfig, *, resume: bool, stop_after: int | None, progress: bool, log) -> dict:
    device = _device(cfg)
    init_process_group(device)
    rank, world = rank_world()
    out = Path(cfg.out)
    if cfg.batch_size % world:
        raise ValueError(f"config: batch_size {cfg.batch_size} must be divisible by the {world} processes")
    step_kind = kind_of(cfg)
    train_ds, test_ds = step_kind.datasets(cfg)
    split_note = getattr(test_ds, "split_note", None)  # a folder without a split: its held-out part
    eval_split = split_name(test_ds, cfg.eval_split)  # Gaussian folders know their own split
    if split_note and rank == 0:
        log(f"data: {split_note}")
    train_ds, test_ds = limit(train_ds, cfg.limit_train), limit(test_ds, cfg.limit_eval)
    collate = step_kind.collate(cfg)
    classes = list(train_ds.classes)
    cfg, notes = cfg.for_training_set(len(train_ds))
    if rank == 0:
        for note in notes:
            log(f"config: {note}")
    run = model_step(cfg, len(classes), device)
    run.attach_training_set(train_ds, collate)
    if run.starts_from() and not resume:  # another run's weights (finetune_from, stage1)
        run.load_pretrained(load_checkpoint(run.starts_from(), map_location=device), log)
    start, bad_steps = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        recorded = config_from_dict(state["config"], where=str(ckpt_path)).to_dict()
        check_settings({k: v for k, v in recorded.items() if k != "out"},
                       {k: v for k, v in cfg.to_dict().items() if k != "out"}, ckpt_path,
                       hint="resume with the settings of that run, or train into another out=")
        run.load_state_dict(state)
        start, bad_steps = int(state["step"]), int(state["bad_steps"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / "metrics.jsonl", start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    sampler = StepBatches(len(train_ds), cfg.batch_size, start, end, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, persistent_workers=False)
    curves = _curve_sets(cfg, step_kind, train_ds) if rank == 0 and cfg.eval_every and run.classifies else None
    bar = progress_bar(cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step", enabled=progress and rank == 0)
    t0 = time.perf_counter()
    step = start
    try:
        for step, (inputs, labels) in enumerate(loader, start=start):
            metrics = run.step(step, inputs, labels, step_generator(cfg.seed, step), rank, world)
            if metrics is None:
                bad_steps += 1
                if bad_steps > cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"training stopped at step {step}: {bad_steps} steps had NaN/inf losses or gradients "
                        f"(skipped); lower gamma, base_lr or set grad_clip")
                continue
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or run.logs_step(step)):
                metrics.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3), bad_steps=bad_steps)
                append_line(out / "metrics.jsonl", json.dumps(metrics))
            if curves and (step + 1) % cfg.eval_every == 0:
                measured = {f"{name}_{key}": value for name, ds in curves.items()
                            for key, value in ModelStep.evaluate(run, ds, collate).items() if key in ("top1", "loss")}
                append_line(out / "metrics.jsonl", json.dumps({"step": step + 1, **measured}))
            bar.update(1)
            if rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(ckpt_path, _state(run, cfg, step + 1, bad_steps, classes))
        step = end
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(ckpt_path, _state(run, cfg, step, bad_steps, classes))
            log(f"interrupted at step {step}; checkpoint written, continue with --resume")
        raise
    finally:
        bar.close()
    if rank == 0:
        save_checkpoint(ckpt_path, _state(run, cfg, end, bad_steps, classes))
    if end < cfg.steps:
        return {"step": end, "finished": False}
    result = {"step": end, "finished": True, "bad_steps": bad_steps, "train_seconds": time.perf_counter() - t0}
    if split_note:
        result["split_note"] = split_note
    if test_ds is not None and rank == 0:
        result.update(evaluate(run, test_ds, collate), eval_split=eval_split)
        if run.classifies:  # top-1 and loss on as many training images: the train-eval gap in view
            seen = ModelStep.evaluate(run, limit(train_ds, len(test_ds)), collate)
            result.update({f"train_{key}": seen[key] for key in ("top1", "loss", "eval_images")})
    if cfg.val_every and cfg.eval_split != "val" and rank == 0:  # the carved validation images too
        _, val_ds = step_kind.datasets(replace(cfg, eval_split="val"))
        val = evaluate(run, limit(val_ds, cfg.limit_eval), collate) | {"eval_split": split_name(val_ds, "val")}
        result.update({f"val_{key}": value for key, value in val.items()})
    if rank == 0:
        write_json(out / "result.json", result)
    return result


def train_or_reuse(cfg: TrainConfig, *, resume: bool = True, overwrite: bool = False, progress: bool = True,
                   log=print) -> dict:
    """The result of the run ``cfg`` describes. With ``resume``, a run that finished before (its
    ``<out>/result.json`` exists) is read back, not trained again, and an interrupted one continues
    from its checkpoint; with ``overwrite`` the run is trained again from the start."""
    out = Path(cfg.out)
    if resume and not overwrite and (out / "result.json").is_file():
        log(f"{out}: finished before, kept")
        return json.loads((out / "result.json").read_text())
    has_checkpoint = (out / "checkpoint.pt").is_file()
    # asked to resume a run killed before its first checkpoint: nothing of it is kept, so it starts again
    return train(cfg, resume=resume and not overwrite and has_checkpoint,
                 overwrite=overwrite or (resume and not has_checkpoint), progress=progress, log=log)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run that was killed after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(ln + "\n" for ln in lines))


def evaluate(run: ModelStep, dataset, collate) -> dict:
    """The run's measures on ``dataset`` (:meth:`gvit.train.base.ModelStep.evaluate`: top-1 for
    classifiers, PSNR for GViT, reconstruction and codebook measures for the tokenizer)."""
    return run.evaluate(dataset, collate)


class TrainedRun:
    """A finished (or checkpointed) run loaded for use: ``cfg``, ``step`` (the :class:`ModelStep`,
    models in eval mode), ``classes``; ``model`` is the :class:`gvit.models.GViT` of a GViT run."""

    def __init__(self, cfg: TrainConfig, step: ModelStep, classes: list[str]):
        self.cfg, self.step, self.classes = cfg, step, classes

    @property
    def kind(self) -> type[ModelStep]:
        """The run's kind (what it can do: :class:`gvit.train.base.ModelStep`'s capabilities)."""
        return type(self.step)

    @property
    def model(self):
        model = getattr(self.step, "model", None)  # GViT and the tokenizer own one model
        return self.step.classifier if model is None else model

    def test_data(self):
        """``(test dataset, collate)`` of the run's evaluation split (limited as configured)."""
        _, test = self.kind.datasets(self.cfg)
        if test is None:
            raise ValueError(f"no evaluation split {self.cfg.eval_split!r} in {self.cfg.data}")
        return limit(test, self.cfg.limit_eval), self.kind.collate(self.cfg)

    def evaluate(self) -> dict:
        """The run's measures on its evaluation split, with ``eval_split``: the split's name (a
        Gaussian folder's own, else the config's ``eval_split``)."""
        test, collate = self.test_data()
        return evaluate(self.step, test, collate) | {"eval_split": split_name(test, self.cfg.eval_split)}


def load_trained(path: str | os.PathLike, overrides: list[str] | None = None, device=None) -> TrainedRun:
    """A run from its checkpoint, models in eval mode on ``device`` (the config's when None);
    ``key=value`` overrides (e.g. ``data=...``) apply on top of the saved config."""
    state = load_checkpoint(path)
    cfg = with_overrides(config_from_dict(state["config"], where=str(path)), overrides)
    device = _device(cfg) if device is None else torch.device(device)
    run = model_step(cfg, len(state["classes"]), device)
    try:
        run.load_state_dict(state, optimizers=False)
    except (RuntimeError, ValueError) as exc:
        overridden = {o.partition("=")[0] for o in overrides or []}
        changed = [k for k in settings_diff(state["config"], cfg.to_dict()) if k in overridden]
        if changed:
            raise ValueError(f"{path}: {', '.join(changed)} changes the model this checkpoint holds; override only "
                             f"what does not (data, eval_split, limit_eval, device, ...)") from None
        raise ValueError(f"{path}: the weights do not match the config ({str(exc).splitlines()[0]})") from None
    run.train(False)
    return TrainedRun(cfg, run, list(state["classes"]))


def load_gvit(path: str | os.PathLike, overrides: list[str] | None = None, device=None, *, job: str = "this job"):
    """:func:`load_trained` for jobs that need a GViT (ValueError naming the checkpoint otherwise)."""
    trained = load_trained(path, overrides, device)
    if not trained.kind.makes_gaussians:
        raise ValueError(f"{path}: {job} needs a GViT checkpoint (model=gvit), got model={trained.cfg.model!r}")
    return trained


def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Evaluate a checkpoint on its config's evaluation split (``key=value`` overrides, e.g.
    ``data=...``, apply on top of the saved config)."""
    return load_trained(path, overrides).evaluate()
