"""One entry point for every dataset gvit reads: :func:`open_dataset`.

Every dataset yields ``(image [3, H, W] float32 in [0, 1], label int)`` and has ``classes``
(names, index = label) and ``labels`` (``[N]`` int64, without decoding any image).

Splits are ``train``, ``val`` and ``test``. ``val`` is carved from the training images
(:func:`carve_validation`: every ``val_every``-th image of each class, deterministic) and those
images then leave ``train``, so a run never trains on what it is validated on; a folder with a
``val`` split of its own (``val.zip`` or ``val/``) uses it instead. ``val_every=0`` (the default of
:func:`open_dataset`) carves nothing: ``train`` is every training image and there is no ``val``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor

from .base import InMemoryImages, Subset, dataset_labels
from .captions import CaptionedShapes
from .cifar import CifarBatches, is_cifar
from .images import ImageFolder
from .shapes import SHAPE_CLASSES, make_shapes

SPLITS = ("train", "val", "test")
SHAPES_SIZES = {"train": 4096, "test": 1024}


class ShapesDataset(InMemoryImages):
    """The built-in procedural shapes (:func:`gvit.data.shapes.make_shapes`) as a dataset.

    The train and test splits use different seeds, so they share no image. ``masks`` holds each
    image's object mask ``[N, H, W]``.
    """

    def __init__(self, split: str = "train", *, n: int | None = None, size: int = 32, seed: int = 0):
        if split not in SHAPES_SIZES:
            raise ValueError(f"shapes split must be one of {tuple(SHAPES_SIZES)}, got {split!r}")
        n = SHAPES_SIZES[split] if n is None else n
        if n < 1:
            raise ValueError(f"shapes: n must be >= 1, got {n}")
        self.images, self.targets, self.masks = _shapes(n, size, seed * 2 + (split == "test"))
        self.classes = list(SHAPE_CLASSES)


@functools.lru_cache(maxsize=4)
def _shapes(n: int, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`make_shapes`, generated once per process for each (n, size, seed): a run opens its
    splits several times (training, evaluation, the report; ``gvit demo`` twice over, 1.5 s each
    for 8,192 images). The tensors are shared between the datasets and read-only by convention;
    every augmentation makes new ones."""
    return make_shapes(n, size, seed=seed)


def open_dataset(path: str | os.PathLike, split: str = "train", *, val_every: int = 0,
                 **kwargs) -> torch.utils.data.Dataset:
    """Open a dataset by path (``kwargs`` go to the dataset class); ``split`` ``train``, ``val``
    (with ``val_every`` > 0, or a folder's own ``val``) or ``test``.

    ``path`` is one of:

    * ``"shapes"`` (or ``"shapes:N"`` for N images): the built-in procedural dataset;
      ``"captioned-shapes"`` (``"captioned-shapes:N"``): the captioned shapes
      (:class:`gvit.data.captions.CaptionedShapes`, splits train and test);
    * a folder holding ``<split>.zip`` or ``<split>/`` ImageFolder trees (how ../shared/data
      stores CIFAR-10 and Fashion-MNIST);
    * a CIFAR-10/100 python layout (folder or .tar.gz, see :mod:`gvit.data.cifar`);
    * one ImageFolder tree, a folder or a .zip, with no split of its own: every 10th image of each
      class (in file order) is held out as ``test`` and the rest is ``train``
      (:func:`held_out_split`; the dataset's ``split_note`` says so), so an evaluation never runs on
      training images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(val_every, int) or val_every < 0:
        raise ValueError(f"val_every must be an int >= 0, got {val_every!r}")
    own_val = _own_split(path, "val")
    if split == "test" or (split == "val" and own_val):
        return _open_split(path, split, kwargs)
    if split == "val" and not val_every:
        raise ValueError(f"dataset {path}: no validation split (it has no val/ of its own; set val_every > 0 "
                         f"to carve one from the training images)")
    train = _open_split(path, "train", kwargs)
    return train if own_val or not val_every else carve_validation(train, split, val_every)


def _own_split(path, split: str) -> bool:
    """Whether ``path`` is a folder holding ``<split>.zip`` or ``<split>/``."""
    root = Path(path)
    return root.is_dir() and not is_cifar(root) and any(c.exists() for c in (root / f"{split}.zip", root / split))


def _open_split(path, split: str, kwargs: dict) -> torch.utils.data.Dataset:
    """One split as the dataset stores it (``val`` only where the folder has its own)."""
    text = str(path)
    name, _, n = text.partition(":")
    if name in ("shapes", "captioned-shapes"):
        if n and not n.isdigit():
            raise ValueError(f"dataset {text!r}: expected {name} or {name}:N with N a positive integer")
        kind = ShapesDataset if name == "shapes" else CaptionedShapes
        return kind(split, n=int(n) if n else None, **kwargs)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset: {root} does not exist (expected a folder, a .zip, a CIFAR "
                                "python folder or .tar.gz, or 'shapes')")
    if is_cifar(root):
        return CifarBatches(root, split, **kwargs)  # train or test (val is carved)
    if root.is_dir():
        for candidate in (root / f"{split}.zip", root / split):
            if candidate.exists():
                return ImageFolder(candidate, **kwargs)
    return held_out_split(ImageFolder(root, **kwargs), split)


HELD_OUT_EVERY = 10


def every_nth_of_each_class(labels: list[int], every: int) -> list[bool]:
    """Per item, whether it is the ``every``-th, 2 ``every``-th, ... item of its class (in order)."""
    seen: dict[int, int] = {}
    marks = []
    for label in labels:
        marks.append(seen.get(label, 0) % every == every - 1)
        seen[label] = seen.get(label, 0) + 1
    return marks


def carve_validation(train, split: str, val_every: int):
    """``val``: every ``val_every``-th image of each class of ``train`` (in its order); ``train``:
    the others. Deterministic, disjoint, and the same for every run with the same ``val_every``."""
    marks = every_nth_of_each_class(dataset_labels(train).tolist(), val_every)
    chosen = [i for i, is_val in enumerate(marks) if is_val == (split == "val")]
    if not chosen:
        raise ValueError(f"dataset: no {split} images after holding out every {val_every}th training image of each "
                         f"class (too few images)")
    if isinstance(train, InMemoryImages):
        return train.select(chosen)
    subset = Subset(train, chosen)
    for name in ("root", "split_note"):
        if hasattr(train, name):
            setattr(subset, name, getattr(train, name))
    return subset


def held_out_split(folder, split: str):
    """The deterministic split of one ImageFolder tree: within each class (files in sorted order)
    every :data:`HELD_OUT_EVERY`-th image is ``test``, the others ``train``."""
    marks = every_nth_of_each_class([label for _, label in folder.samples], HELD_OUT_EVERY)
    chosen = [i for i, held_out in enumerate(marks) if held_out == (split == "test")]
    if not chosen:
        raise ValueError(f"dataset {folder.root}: no {split} images after holding out every {HELD_OUT_EVERY}th "
                         f"image of each class (too few images; give it train/ and test/ folders)")
    subset = Subset(folder, chosen)
    subset.root = folder.root
    subset.split_note = (f"{folder.root} has no train/test split: every {HELD_OUT_EVERY}th image of each class is "
                         f"held out for evaluation; this is the {split} part ({len(chosen)} images)")
    return subset
