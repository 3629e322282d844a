"""Training GViT and its baselines: one config, one loop (paper 2.2, Algorithm 1, Appendix A).

``train(cfg)`` runs ``cfg.steps`` optimisation steps. Each step's phase comes from
:class:`gvit.guidance.Phases`; a step is

* ``encoder``: encoder on the reconstruction loss;
* ``classifier-pretrain``: classifier on Gaussians from the frozen encoder;
* ``joint``: both, on reconstruction + lambda_cls * cross-entropy;
* ``guidance``: encoder only, gradient grad_rec + gamma * grad_cls, classifier frozen.

Models (``cfg.model``): ``gvit`` (denoising encoder, or learned queries, + Gaussian classifier),
``patch_vit`` (the baseline on pixels) and ``offline`` (the Gaussian classifier on Gaussians saved by
``gvit fit-dataset``, or with ``offline_input=renders`` a patch ViT on their renders).

Reproducibility: the data order, the augmentation and g0 of step s come from generators seeded
by (seed, s) (and the rank), so a run resumed from a checkpoint (model, optimisers, step) ends
with exactly the weights of an uninterrupted run. Data parallel under torchrun: every rank takes
its slice of each global batch and gradients are averaged with one all-reduce per model before
each optimiser step (a flat all-reduce rather than the DistributedDataParallel wrapper, because a
guidance step takes two separate gradients with ``torch.autograd.grad``, which DDP's hooks do not
see). Checkpoints are written atomically and load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import atomic_path
from .data import Subset, open_dataset, spread_indices
from .data.transforms import crop_boxes, resize_square, resized_crop
from .gaussians import ANGLE, G0_LAYOUTS, POS, decode, sample_initial
from .guidance import Phases, batch_losses, guidance_backward
from .losses import RECONSTRUCTION_LOSSES, psnr
from .models import SIZES, GaussianClassifier, GaussianEncoder, PatchViT
from .render import render

__all__ = ["TrainConfig", "load_config", "train", "evaluate", "evaluate_checkpoint", "load_checkpoint", "load_trained",
           "MODELS"]

MODELS = ("gvit", "patch_vit", "offline")
OFFLINE_INPUTS = ("gaussians", "renders")
_PHASE_FIELDS = ("perceptual_from", "classifier_from", "pretrain_until", "guidance_from", "lambda_perc",
                 "lambda_cls", "gamma", "guidance_every")


@dataclass
class TrainConfig:
    """Every setting of a run; ``gvit train --config FILE key=value ...`` fills it."""

    # data
    data: str = "shapes"
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32
    limit_train: int | None = None
    limit_eval: int | None = None
    num_workers: int = 0
    # model
    model: str = "gvit"
    encoder_size: str = "tiny"
    classifier_size: str = "tiny"
    patch: int = 4  # patch size of the patch ViT and (unless encoder_patch is set) of the Gaussian encoder
    encoder_patch: int | None = None
    num_gaussians: int = 64
    g0_layout: str = "uniform"  # g0's means: uniform (paper), stratified or grid (jittered grid); see sample_initial
    scale_factor: float = 1.0
    learned_queries: bool = False
    sample_image: bool = False  # Gaussian tokens also see the image through g0's footprint (GaussianEncoder)
    image_colors: bool = False  # g0's colours read from the image at its centres (GaussianEncoder)
    pool: str = "cls"
    offline_train: str | None = None
    offline_eval: str | None = None
    offline_input: str = "gaussians"  # model=offline: the classifier reads the Gaussians, or a patch ViT their renders
    # transfer (gvit finetune): start from a GViT checkpoint, encoder frozen, classifier with
    # layer-wise lr decay (Table A.1b); the head is new when the number of classes differs
    finetune_from: str | None = None
    layer_decay: float = 1.0
    # losses and phases (fractions of training)
    pixel_loss: str = "bce"
    guidance: bool = True
    perceptual_from: float = Phases.perceptual_from  # the phase keys: see gvit.guidance.Phases
    classifier_from: float = Phases.classifier_from
    pretrain_until: float | None = Phases.pretrain_until
    guidance_from: float = Phases.guidance_from
    lambda_perc: float = Phases.lambda_perc
    lambda_cls: float = Phases.lambda_cls
    gamma: float = Phases.gamma
    guidance_every: int = Phases.guidance_every
    # optimisation (``epochs``, when set, replaces ``steps`` by ceil(epochs * train images / batch_size))
    steps: int = 1000
    epochs: float | None = None
    batch_size: int = 128
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup: float = 0.05
    grad_clip: float | None = None
    max_bad_steps: int = 20
    # augmentation
    crop_scale_min: float = 0.5
    hflip: bool = True
    # run
    seed: int = 0
    out: str = "runs/train"
    log_every: int = 20
    checkpoint_every: int = 200
    device: str = "auto"

    def __post_init__(self) -> None:
        choices = {"model": MODELS, "encoder_size": tuple(SIZES), "classifier_size": tuple(SIZES),
                   "pool": ("cls", "mean"), "pixel_loss": tuple(RECONSTRUCTION_LOSSES),
                   "device": ("auto", "cpu", "cuda"), "g0_layout": G0_LAYOUTS,
                   "offline_input": OFFLINE_INPUTS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        positive = ("image_size", "patch", "num_gaussians", "steps", "batch_size", "log_every", "checkpoint_every",
                    "max_bad_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("patch", "encoder_patch"):
            value = getattr(self, key)
            if value is not None and (value < 1 or self.image_size % value):
                raise ValueError(f"config: {key} must be >= 1 and divide image_size {self.image_size}, got {value}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"config: crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"config: epochs must be > 0 (or null), got {self.epochs}")
        if self.base_lr <= 0 or self.scale_factor <= 0:
            raise ValueError("config: base_lr and scale_factor must be > 0")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"config: layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.finetune_from and self.model != "gvit":
            raise ValueError("config: finetune_from needs model=gvit")
        for key in ("sample_image", "image_colors"):
            if getattr(self, key) and self.learned_queries:
                raise ValueError(f"config: {key} needs g0, so it cannot be combined with learned_queries")
        if self.model == "offline" and not self.offline_train:
            raise ValueError("config: model=offline needs offline_train (a folder written by gvit fit-dataset)")
        self.phases()  # validates the phase fractions

    def phases(self) -> Phases:
        values = {k: getattr(self, k) for k in _PHASE_FIELDS}
        if not self.guidance:
            values["guidance_from"] = 1.0
        if self.model != "gvit":  # a single classifier: it trains from the first step
            values.update(classifier_from=0.0, pretrain_until=None, guidance_from=1.0)
        if self.finetune_from:  # the classifier alone, on the frozen encoder's Gaussians
            values.update(perceptual_from=1.0, classifier_from=0.0, pretrain_until=1.0, guidance_from=1.0)
        try:
            return Phases(**values)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None


def _coerce(key: str, text: str, kind):
    optional = typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", ()))
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return base(text)
    except ValueError:
        raise ValueError(f"config: {key} expects {getattr(base, '__name__', base)}, got {text!r}") from None


def _parse_overrides(overrides: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: typed value}``; an unknown key or bad value raises ValueError."""
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r}: expected key=value")
        if key not in hints:
            raise ValueError(f"config: unknown key {key!r}; keys are {', '.join(hints)}")
        values[key] = _coerce(key, text, hints[key])
    return values


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML (or JSON) file and ``key=value`` overrides; an unknown key
    or a bad value raises ValueError naming it (and the allowed keys or values)."""
    import yaml

    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {p}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p}: expected a mapping of key: value")
        values.update(loaded)
    values.update(_parse_overrides(overrides or []))
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"config: unknown key(s) {', '.join(unknown)}; keys are {', '.join(hints)}")
    return TrainConfig(**values)


# --------------------------------------------------------------------------- distributed helpers


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank."""
    if _dist()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce)."""
    rank, world = _dist()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


# --------------------------------------------------------------------------- data


class _StepBatches(torch.utils.data.Sampler):
    """Index lists of steps ``start .. total-1``: epoch e is a permutation seeded by (seed, e),
    batches are consecutive slices of it (last partial batch dropped), each rank takes its slice."""

    def __init__(self, n: int, batch: int, start: int, total: int, seed: int, rank: int, world: int):
        if batch > n:
            raise ValueError(f"batch_size {batch} is larger than the dataset ({n} items)")
        self.n, self.batch, self.start, self.total, self.seed = n, batch, start, total, seed
        self.rank, self.world = rank, world
        self.per_epoch = n // batch

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        order, epoch = None, -1
        for step in range(self.start, self.total):
            e, i = divmod(step, self.per_epoch)
            if e != epoch:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
                epoch = e
            idx = order[i * self.batch:(i + 1) * self.batch]
            yield idx[self.rank::self.world].tolist()


def _collate(size: int):
    def collate(items):
        images = [resize_square(img, size) for img, _ in items]
        return torch.stack(images), torch.tensor([label for _, label in items], dtype=torch.long)

    return collate


class _OfflineGaussians(torch.utils.data.Dataset):
    """Raw Gaussians ``[k, 9]`` + valid mask from a ``gvit fit-dataset`` folder."""

    def __init__(self, folder: str, scale_factor: float):
        from .convert import load_shards
        from .gaussians import encode

        g, labels, _, manifest = load_shards(folder)
        self.raw = encode(g, scale_factor=scale_factor)
        self.valid = g.valid if g.valid is not None else torch.ones(g.means.shape[:2], dtype=torch.bool)
        self.targets = labels
        self.classes = manifest.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return (self.raw[i], self.valid[i]), int(self.targets[i])


def _offline_collate(items):
    raw = torch.stack([r for (r, _), _ in items])
    valid = torch.stack([v for (_, v), _ in items])
    return (raw, valid), torch.tensor([label for _, label in items], dtype=torch.long)


def _flip_gaussians(raw: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right the raw Gaussian sets where ``flip`` ``[B]`` is True: x -> -x, angle -> -angle."""
    mirrored = raw.clone()
    mirrored[..., POS.start] = -mirrored[..., POS.start]  # x
    mirrored[..., ANGLE] = -mirrored[..., ANGLE]
    return torch.where(flip[:, None, None], mirrored, raw)


def _datasets(cfg: TrainConfig):
    if cfg.model == "offline":
        train = _OfflineGaussians(cfg.offline_train, cfg.scale_factor)
        test = _OfflineGaussians(cfg.offline_eval, cfg.scale_factor) if cfg.offline_eval else None
        return train, test, _offline_collate
    train = open_dataset(cfg.data, cfg.train_split)
    try:
        test = open_dataset(cfg.data, cfg.eval_split)
    except (FileNotFoundError, ValueError):
        test = None
    return train, test, _collate(cfg.image_size)


def _limit(ds, n: int | None):
    """The whole dataset, or ``n`` images evenly spread over it (balanced for class-sorted folders)."""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, spread_indices(len(ds), n))


# --------------------------------------------------------------------------- models and optimisers


@dataclass
class _Run:
    encoder: nn.Module | None
    classifier: nn.Module
    enc_opt: torch.optim.Optimizer | None
    cls_opt: torch.optim.Optimizer


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings and tokens 0, block i -> i + 1,
    the final norm and the head depth + 1."""
    if name.startswith("transformer.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("transformer.norm", "head")):
        return depth + 1
    return 0


def _param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, position embeddings, tokens,
    queries); with ``layer_decay`` < 1 each group's ``lr_scale`` is layer_decay ** (depth + 1 - layer)."""
    depth = len(model.transformer.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "queries"))
        layer = layer_id(name, depth) if layer_decay != 1.0 else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay != 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_models(cfg: TrainConfig, num_classes: int, device) -> _Run:
    torch.manual_seed(cfg.seed)
    encoder = None
    if cfg.model == "patch_vit" or (cfg.model == "offline" and cfg.offline_input == "renders"):
        classifier = PatchViT(cfg.image_size, cfg.patch, num_classes, cfg.classifier_size, pool=cfg.pool)
    else:
        classifier = GaussianClassifier(cfg.num_gaussians, num_classes, cfg.classifier_size, pool=cfg.pool)
        if cfg.model == "gvit":
            encoder = GaussianEncoder(cfg.image_size, cfg.encoder_patch or cfg.patch, cfg.num_gaussians, cfg.encoder_size,
                                      learned_queries=cfg.learned_queries, sample_image=cfg.sample_image, image_colors=cfg.image_colors,
                                      scale_factor=cfg.scale_factor).to(device)
    classifier = classifier.to(device)

    def adamw(model, layer_decay=1.0):
        return torch.optim.AdamW(_param_groups(model, cfg.weight_decay, layer_decay), lr=cfg.base_lr,
                                 betas=(cfg.beta1, cfg.beta2))

    return _Run(encoder, classifier, adamw(encoder) if encoder is not None else None,
                adamw(classifier, cfg.layer_decay))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """base_lr * batch / 256, linear warm-up over ``warmup`` of training, then cosine to 0."""
    peak = cfg.base_lr * cfg.batch_size / 256
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, run: _Run, cfg: TrainConfig, step: int, bad_steps: int, classes: list[str]) -> None:
    state = {"step": step, "bad_steps": bad_steps, "config": asdict(cfg), "classes": list(classes),
             "classifier": run.classifier.state_dict(), "cls_opt": run.cls_opt.state_dict()}
    if run.encoder is not None:
        state["encoder"] = run.encoder.state_dict()
        state["enc_opt"] = run.enc_opt.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint without executing code (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, refused globals
        raise ValueError(f"{path}: not a readable gvit checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "classifier" not in state or "config" not in state:
        raise ValueError(f"{path}: not a gvit checkpoint (missing classifier / config)")
    return state


# --------------------------------------------------------------------------- the loop


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config: device=cuda but no CUDA device is available")
    return torch.device(cfg.device)


def _num(t: Tensor) -> float:
    return float(t.detach())


def _finite_grads(params) -> bool:
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
          log=print) -> dict:
    """Train per ``cfg``; returns the final evaluation (or a partial summary when ``stop_after``
    steps of this call ran first, as when a job is interrupted). ``resume`` continues from
    ``<out>/checkpoint.pt``."""
    device = _device(cfg)
    init_distributed(device)
    rank, world = _dist()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(cfg.out)
    if cfg.batch_size % world:
        raise ValueError(f"config: batch_size {cfg.batch_size} must be divisible by the {world} processes")
    train_ds, test_ds, collate = _datasets(cfg)
    train_ds, test_ds = _limit(train_ds, cfg.limit_train), (_limit(test_ds, cfg.limit_eval) if test_ds else None)
    classes = list(train_ds.classes)
    if cfg.epochs is not None:
        cfg = replace(cfg, steps=max(1, math.ceil(cfg.epochs * len(train_ds) / cfg.batch_size)), epochs=None)
    run = build_models(cfg, len(classes), device)
    if cfg.finetune_from and not resume:
        _load_pretrained(run, load_checkpoint(cfg.finetune_from, map_location=device), len(classes), log)
    phases = cfg.phases()
    start, bad_steps = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        saved = {k: v for k, v in state["config"].items() if k not in ("out",)}
        mine = {k: v for k, v in asdict(cfg).items() if k not in ("out",)}
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            raise ValueError(f"{ckpt_path}: the checkpoint was made with other settings ({', '.join(diff)})")
        run.classifier.load_state_dict(state["classifier"])
        run.cls_opt.load_state_dict(state["cls_opt"])
        if run.encoder is not None:
            run.encoder.load_state_dict(state["encoder"])
            run.enc_opt.load_state_dict(state["enc_opt"])
        start, bad_steps = int(state["step"]), int(state["bad_steps"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / "metrics.jsonl", start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    sampler = _StepBatches(len(train_ds), cfg.batch_size, start, end, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, persistent_workers=False)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step")
    t0 = time.perf_counter()
    step = start
    try:
        for step, (inputs, labels) in enumerate(loader, start=start):
            metrics = _train_step(cfg, run, phases, step, inputs, labels, device, rank)
            if metrics is None:
                bad_steps += 1
                if bad_steps > cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"training stopped at step {step}: {bad_steps} steps had NaN/inf losses or gradients "
                        f"(skipped); lower gamma, base_lr or set grad_clip")
                continue
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                metrics.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3), bad_steps=bad_steps)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if bar is not None:
                bar.update(1)
            if rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(ckpt_path, run, cfg, step + 1, bad_steps, classes)
        step = end
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(ckpt_path, run, cfg, step, bad_steps, classes)
            log(f"interrupted at step {step}; checkpoint written, continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        save_checkpoint(ckpt_path, run, cfg, end, bad_steps, classes)
    if end < cfg.steps:
        return {"step": end, "finished": False}
    result = {"step": end, "finished": True, "bad_steps": bad_steps, "train_seconds": time.perf_counter() - t0}
    if test_ds is not None and rank == 0:
        result.update(evaluate(cfg, run, test_ds, collate, device))
    if rank == 0:
        from ._io import write_json

        write_json(out / "result.json", result)
    return result


def _load_pretrained(run: _Run, state: dict, num_classes: int, log) -> None:
    """Encoder and classifier weights from a GViT checkpoint; the head only when the classes match."""
    if "encoder" not in state:
        raise ValueError("finetune_from: the checkpoint has no Gaussian encoder (not a model=gvit run)")
    run.encoder.load_state_dict(state["encoder"])
    weights = dict(state["classifier"])
    if weights["head.weight"].shape[0] != num_classes:
        del weights["head.weight"], weights["head.bias"]
        log(f"finetune: new head for {num_classes} classes (the checkpoint has {state['classifier']['head.weight'].shape[0]})")
    missing, unexpected = run.classifier.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise ValueError(f"finetune_from: the classifier does not match this config (missing {missing}, "
                         f"unexpected {unexpected})")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run that was killed after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(ln + "\n" for ln in lines))


def _train_step(cfg: TrainConfig, run: _Run, phases: Phases, step: int, inputs, labels: Tensor, device,
                rank: int) -> dict | None:
    """One optimisation step; returns its metrics, or None when it was skipped (NaN/inf)."""
    phase = phases.at(step, cfg.steps)
    lr = learning_rate(cfg, step)
    for opt in (run.enc_opt, run.cls_opt):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
    # randomness of step s is drawn for the whole global batch from (seed, s), then sliced like the
    # data, so it does not depend on the number of processes
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    world = _dist()[1]
    flips = (torch.rand(cfg.batch_size, generator=gen) < 0.5)[rank::world] & cfg.hflip
    labels = labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    metrics = {"phase": phase.name, "lr": lr}
    if cfg.model == "offline":
        raw, valid = inputs
        raw = _flip_gaussians(raw, flips)
        with autocast:
            loss = F.cross_entropy(_offline_logits(cfg, run, raw.to(device), valid.to(device)), labels)
        return _apply(cfg, [(run.classifier, run.cls_opt)], loss, metrics | {"loss_cls": _num(loss)})
    size = cfg.image_size
    boxes = crop_boxes(cfg.batch_size, size, size, scale=(cfg.crop_scale_min, 1.0), generator=gen)[rank::world]
    images = resized_crop(inputs, boxes, (size, size))
    images = torch.where(flips[:, None, None, None], images.flip(-1), images).to(device)
    if cfg.model == "patch_vit":
        with autocast:
            loss = F.cross_entropy(run.classifier(images), labels)
        return _apply(cfg, [(run.classifier, run.cls_opt)], loss, metrics | {"loss_cls": _num(loss)})
    g0 = _sample_g0(cfg, cfg.batch_size, gen)
    g0 = None if g0 is None else g0[rank::world].to(device)
    kw = dict(scale_factor=cfg.scale_factor, pixel_loss=cfg.pixel_loss, lambda_perc=phase.lambda_perc)
    if phase.guidance:
        run.enc_opt.zero_grad(set_to_none=True)
        with autocast:
            out = guidance_backward(run.encoder, run.classifier, images, labels, g0, gamma=cfg.gamma, **kw)
        metrics.update(loss_rec=_num(out.reconstruction), loss_cls=_num(out.classification))
        return _apply(cfg, [(run.encoder, run.enc_opt)], None, metrics)
    with autocast:
        if phase.train_encoder:
            out = batch_losses(run.encoder, run.classifier if phase.train_classifier else None, images, labels, g0, **kw)
        else:  # classifier pre-training on the frozen encoder's Gaussians
            with torch.no_grad():
                g = run.encoder(images, g0)
            out = None
            loss_cls = F.cross_entropy(run.classifier(g), labels)
    if out is None:
        metrics.update(loss_cls=_num(loss_cls))
        return _apply(cfg, [(run.classifier, run.cls_opt)], loss_cls, metrics)
    loss = out.reconstruction
    metrics.update(loss_rec=_num(out.reconstruction))
    trained = [(run.encoder, run.enc_opt)]
    if out.classification is not None:
        loss = loss + phase.lambda_cls * out.classification
        metrics.update(loss_cls=_num(out.classification))
        trained.append((run.classifier, run.cls_opt))
    return _apply(cfg, trained, loss, metrics)


def _offline_logits(cfg: TrainConfig, run: _Run, raw: Tensor, valid: Tensor) -> Tensor:
    """The classifier on saved Gaussians, or (``offline_input=renders``) the patch ViT on their
    renders at ``image_size`` (the rasterisation control of the leakage tests)."""
    if cfg.offline_input == "gaussians":
        return run.classifier(raw, valid)
    with torch.no_grad():
        g = replace(decode(raw.float(), cfg.scale_factor), valid=valid)
        images = render(g, height=cfg.image_size, width=cfg.image_size).clamp(0, 1)
    return run.classifier(images)


def _sample_g0(cfg: TrainConfig, n: int, gen: torch.Generator) -> Tensor | None:
    """The encoder's random input Gaussians for ``n`` images (None for learned queries)."""
    if cfg.learned_queries:
        return None
    return sample_initial(n, cfg.num_gaussians, layout=cfg.g0_layout, generator=gen)


def _apply(cfg: TrainConfig, trained, loss: Tensor | None, metrics: dict) -> dict | None:
    """Backward (unless the gradients are already set), average over ranks, guard, clip, step."""
    if loss is not None:
        for _, opt in trained:
            opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        if not _all_ranks(finite):  # every rank skips together, or none does
            for _, opt in trained:
                opt.zero_grad(set_to_none=True)
            return None
    for model, opt in trained:
        params = [p for p in model.parameters() if p.requires_grad]
        _all_reduce_grads(params)
        if not _finite_grads(params):
            opt.zero_grad(set_to_none=True)
            return None
    for model, opt in trained:
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return metrics


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with ``key=value`` overrides applied (parsed and checked as on the command line)."""
    return replace(cfg, **_parse_overrides(overrides)) if overrides else cfg


def load_trained(path: str | os.PathLike, overrides: list[str] | None = None, device=None):
    """``(cfg, run, classes)`` from a checkpoint, models in eval mode on ``device`` (the config's
    when None); ``key=value`` overrides (e.g. ``data=...``) apply on top of the saved config."""
    state = load_checkpoint(path)
    cfg = apply_overrides(TrainConfig(**state["config"]), overrides or [])
    device = _device(cfg) if device is None else torch.device(device)
    run = build_models(cfg, len(state["classes"]), device)
    run.classifier.load_state_dict(state["classifier"])
    run.classifier.eval()
    if run.encoder is not None:
        run.encoder.load_state_dict(state["encoder"])
        run.encoder.eval()
    return cfg, run, list(state["classes"])


def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Evaluate a checkpoint on its config's evaluation split (``key=value`` overrides, e.g.
    ``data=...``, apply on top of the saved config)."""
    cfg, run, _ = load_trained(path, overrides)
    _, test_ds, collate = _datasets(cfg)
    if test_ds is None:
        raise ValueError(f"no evaluation split {cfg.eval_split!r} in {cfg.data}")
    return evaluate(cfg, run, _limit(test_ds, cfg.limit_eval), collate, next(run.classifier.parameters()).device)


@torch.no_grad()
def evaluate(cfg: TrainConfig, run: _Run, dataset, collate, device) -> dict:
    """Top-1 accuracy (and, for GViT, the mean PSNR of the renders) on ``dataset``; g0 is drawn
    from a generator seeded by ``cfg.seed``, so evaluation is deterministic."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate,
                                         num_workers=cfg.num_workers)
    correct, total, psnrs = 0, 0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    for model in (run.encoder, run.classifier):
        if model is not None:
            model.eval()
    for inputs, labels in loader:
        labels = labels.to(device)
        if cfg.model == "offline":
            raw, valid = inputs
            logits = _offline_logits(cfg, run, raw.to(device), valid.to(device))
        elif cfg.model == "patch_vit":
            logits = run.classifier(inputs.to(device))
        else:
            images = inputs.to(device)
            g0 = _sample_g0(cfg, len(images), gen)
            g0 = None if g0 is None else g0.to(device)
            out = batch_losses(run.encoder, run.classifier, images, labels, g0, scale_factor=cfg.scale_factor,
                               pixel_loss=cfg.pixel_loss)
            logits = out.logits
            psnrs.append(psnr(out.rendered.clamp(0, 1), images))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    for model in (run.encoder, run.classifier):
        if model is not None:
            model.train()
    result = {"top1": correct / max(1, total), "eval_images": total}
    if psnrs:
        result["psnr"] = float(torch.cat(psnrs).mean())
    return result

