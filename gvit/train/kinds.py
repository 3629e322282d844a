"""The registry of model kinds: the one list every other list of kinds derives from.

A kind is a :class:`gvit.train.base.ModelStep` subclass in a file of its own; its ``settings`` class
holds the core every run shares and the keys only that kind reads (:mod:`gvit.train.config`), and
its capabilities (``makes_gaussians``, ``tokenizes``, ...) are what tools ask for. This module maps
``model=NAME`` to the kind, and reads settings into the kind's class: from keyword values
(:func:`make_config`), a YAML file and ``key=value`` overrides (:func:`load_config`), or a recorded
run (:func:`config_from_dict`). A key of another kind is refused with a one-line error naming the
kinds it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..settings import from_mapping, parse_overrides, read_settings_file, split_overrides, typed_values
from .base import ModelStep
from .clip_step import ClipStep
from .config import TrainConfig
from .gvit_step import GViTStep
from .offline_step import OfflineStep
from .patch_vit_step import PatchViTStep
from .splat_align_step import AlignStep
from .splat_distill_step import DistillStep
from .tokenizer_step import TokenizerStep

__all__ = ["KINDS", "MODELS", "kind_of", "model_step", "make_config", "load_config", "config_from_dict",
           "with_overrides", "as_kind"]

KINDS: dict[str, type[ModelStep]] = {step.settings.kind: step for step in (
    GViTStep, PatchViTStep, OfflineStep, TokenizerStep, ClipStep, DistillStep, AlignStep)}
MODELS = tuple(KINDS)
DEFAULT_MODEL = "gvit"


def kind_of(cfg_or_name: TrainConfig | str) -> type[ModelStep]:
    """The kind of a run's settings, or of a ``model`` name."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.model
    if name not in KINDS:
        raise ValueError(f"config: model must be one of {', '.join(MODELS)}, got {name!r}")
    return KINDS[name]


def model_step(cfg: TrainConfig, num_classes: int, device) -> ModelStep:
    """A fresh step object (models and optimisers) of the run's kind."""
    return kind_of(cfg)(cfg, num_classes, torch.device(device))


def _check_keys(model: str, keys, where: str) -> type[TrainConfig]:
    """The settings class of ``model``; a key of another kind raises ValueError naming its kinds."""
    settings = kind_of(model).settings
    own = set(settings.keys())
    for key in keys:
        if key not in own:
            owners = [name for name, kind in KINDS.items() if key in kind.settings.keys()]
            if owners:
                raise ValueError(f"{where}: {key} belongs to model={' / '.join(owners)}, not to model={model}")
    return settings  # keys no kind has are named by the settings reader, with the near ones


def make_config(**values) -> TrainConfig:
    """The settings of ``model=values['model']`` (gvit by default) from keyword values."""
    settings = _check_keys(values.get("model", DEFAULT_MODEL), values, "config")
    return from_mapping(settings, values)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                as_model: str | None = None) -> TrainConfig:
    """A run's settings from a YAML (or JSON) file and ``key=value`` overrides on top; an unknown
    key, a key of another kind or a bad value raises ValueError naming it. With ``as_model``, the
    file's settings (read as its own kind) become those of kind ``as_model`` (:func:`as_kind`: the
    keys it shares, e.g. a baseline from a GViT recipe), and the overrides apply to that kind."""
    if as_model is not None:
        settings = _check_keys(as_model, split_overrides(overrides or []), "config")
        return as_kind(load_config(path), as_model, **parse_overrides(settings, overrides or []))
    where = f"config file {Path(path)}" if path is not None else "config"
    loaded = read_settings_file(path) if path is not None else {}
    given = split_overrides(overrides or [])
    model = str(given.get("model", loaded.get("model", DEFAULT_MODEL))).strip()
    recipe = str(loaded.get("model", DEFAULT_MODEL)).strip()
    try:
        settings = _check_keys(model, loaded, where)
    except ValueError as exc:
        if recipe == model:
            raise
        raise ValueError(f"{exc} (a model={recipe} recipe: train model={model} with the keys it shares by "
                         f"--as-model {model}, or load_config(..., as_model={model!r}))") from None
    _check_keys(model, given, "config")
    values = typed_values(settings, loaded, where) | parse_overrides(settings, overrides or [])
    return settings(**values)


def config_from_dict(values: dict, *, where: str = "checkpoint") -> TrainConfig:
    """The settings a checkpoint recorded (from before settings were split by kind as well)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} config: expected a mapping of key: value, got {type(values).__name__}")
    return kind_of(values.get("model", DEFAULT_MODEL)).settings.from_record(values, where=where)


def with_overrides(cfg: TrainConfig, overrides: list[str] | None) -> TrainConfig:
    """``cfg`` with ``key=value`` overrides of its own kind's keys (``model`` cannot change)."""
    given = split_overrides(overrides or [])
    if "model" in given and given["model"].strip() != cfg.model:
        raise ValueError(f"config: model cannot be overridden here (the run is model={cfg.model})")
    _check_keys(cfg.model, given, "config")
    return make_config(**(cfg.to_dict() | parse_overrides(type(cfg), overrides or [])))


def as_kind(cfg: TrainConfig, model: str, **changes) -> TrainConfig:
    """Settings of kind ``model`` that keep every key of ``cfg`` the new kind has (the core, shared
    sections), with ``changes`` on top: a baseline trained with a run's data and budget."""
    keys = set(kind_of(model).settings.keys())
    return make_config(**({k: v for k, v in cfg.to_dict().items() if k in keys} | {"model": model} | changes))
