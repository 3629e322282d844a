"""Checkpoints: written atomically, read without executing code (``weights_only=True``).

A checkpoint is a dict: ``step``, ``bad_steps``, ``config`` (the :class:`TrainConfig` as a dict),
``classes`` and, per trained part, its weights and optimiser state (``classifier`` / ``cls_opt``,
and for GViT ``encoder`` / ``enc_opt``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..files import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
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
    weights = {"classifier", "tokenizer", "clip", "student"}
    if not isinstance(state, dict) or "config" not in state or not weights & state.keys():
        raise ValueError(f"{path}: not a gvit checkpoint (missing model weights / config)")
    return state
