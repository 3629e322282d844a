"""One entry point for every dataset gvit reads: :func:`open_dataset`.

Every dataset yields ``(image [3, H, W] float32 in [0, 1], label int)`` and has ``classes``
(names, index = label) and ``labels`` (``[N]`` int64, without decoding any image).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import InMemoryImages, Subset
from .captions import CaptionedShapes
from .cifar import CifarBatches, is_cifar
from .images import ImageFolder
from .shapes import SHAPE_CLASSES, make_shapes

SPLITS = ("train", "test")
SHAPES_SIZES = {"train": 4096, "test": 1024}


class ShapesDataset(InMemoryImages):
    """The built-in procedural shapes (:func:`gvit.data.shapes.make_shapes`) as a dataset.

    The train and test splits use different seeds, so they share no image. ``masks`` holds each
    image's object mask ``[N, H, W]``.
    """

    def __init__(self, split: str = "train", *, n: int | None = None, size: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
        n = SHAPES_SIZES[split] if n is None else n
        if n < 1:
            raise ValueError(f"shapes: n must be >= 1, got {n}")
        self.images, self.targets, self.masks = make_shapes(n, size, seed=seed * 2 + SPLITS.index(split))
        self.classes = list(SHAPE_CLASSES)


def open_dataset(path: str | os.PathLike, split: str = "train", **kwargs) -> torch.utils.data.Dataset:
    """Open a dataset by path (``kwargs`` go to the dataset class).

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
    text = str(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
        return CifarBatches(root, split, **kwargs)
    if root.is_dir():
        for candidate in (root / f"{split}.zip", root / split):
            if candidate.exists():
                return ImageFolder(candidate, **kwargs)
    return held_out_split(ImageFolder(root, **kwargs), split)


HELD_OUT_EVERY = 10


def held_out_split(folder, split: str):
    """The deterministic split of one ImageFolder tree: within each class (files in sorted order)
    every :data:`HELD_OUT_EVERY`-th image is ``test``, the others ``train``."""
    seen: dict[int, int] = {}
    chosen = []
    for i, (_, label) in enumerate(folder.samples):
        held_out = seen.get(label, 0) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        seen[label] = seen.get(label, 0) + 1
        if held_out == (split == "test"):
            chosen.append(i)
    if not chosen:
        raise ValueError(f"dataset {folder.root}: no {split} images after holding out every {HELD_OUT_EVERY}th "
                         f"image of each class (too few images; give it train/ and test/ folders)")
    subset = Subset(folder, chosen)
    subset.root = folder.root
    subset.split_note = (f"{folder.root} has no train/test split: every {HELD_OUT_EVERY}th image of each class is "
                         f"held out for evaluation; this is the {split} part ({len(chosen)} images)")
    return subset
