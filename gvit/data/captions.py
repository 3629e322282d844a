"""Images with text, for vision-language training and zero-shot tests offline.

Every captioned dataset yields ``(image [3, H, W] float32 in [0, 1], label int)`` items, as every
labelled dataset does (so it can be fitted by ``gvit fit-dataset`` and paired with its Gaussians),
and has ``captions`` (one str per image), ``class_texts`` (what zero-shot prompts call each class:
its name, or its description), ``targets`` (``[N]`` class labels, for zero-shot
classification; -1 where there are no classes), ``classes`` and ``held_out`` (``[N]`` bool or None):

* :class:`CaptionedShapes`: the built-in shapes described by shape, colour, size and position
  ("a small red star at the top left"). Colour words name the nearest corner of the RGB cube (8
  names, equally likely); size is small / large by radius; position is a 3 x 3 grid of places. Six
  (shape, colour) pairs (:data:`HELD_OUT_PAIRS`) never appear in the train split, so zero-shot on
  them tests composition honestly; the test split holds every pair and marks them in ``held_out``.
* :class:`ClassCaptions`: any labelled dataset captioned by a class prompt ("a photo of a cat.").
* :class:`AttributeCaptions`: a labelled dataset whose classes have attributes (:data:`CLASS_ATTRIBUTES`,
  built in for CIFAR-10) captioned by a random part of them ("a photo of a furry animal in a house."),
  so that a class held out of all training can be named at test time, by its full description, in
  words the other classes taught (attribute-based zero-shot).
* :class:`CaptionFile`: real image-caption pairs, a JSON Lines file (``{"image": path, "caption":
  text}`` per line) or a TSV file (``path<TAB>caption``), paths relative to the file's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .base import InMemoryImages, dataset_labels
from .images import read_image
from .shapes import SHAPE_CLASSES, make_shapes

__all__ = ["CaptionedShapes", "ClassCaptions", "AttributeCaptions", "CLASS_ATTRIBUTES", "describe_class",
           "CaptionFile", "CAPTION_KINDS", "COLOR_NAMES", "HELD_OUT_PAIRS", "color_names",
           "describe_shapes", "class_prompt", "class_prompts", "prompt_templates", "mirror_caption", "DEFAULT_PROMPT"]

# the corners of the RGB cube, indexed by 4 r + 2 g + b with each channel rounded to 0 or 1
COLOR_NAMES = ("black", "blue", "green", "cyan", "red", "purple", "yellow", "white")
# (shape, colour) pairs kept out of CaptionedShapes' train split: one colour per shape
HELD_OUT_PAIRS = tuple((shape, COLOR_NAMES[(2 * i + 1) % len(COLOR_NAMES)]) for i, shape in enumerate(SHAPE_CLASSES))
DEFAULT_PROMPT = "a photo of a {}."
CAPTION_KINDS = ("prompt", "attributes")  # how labelled images are captioned: ClassCaptions, AttributeCaptions
# What classes look like, in words several classes share: (noun, adjectives, parts, place). Built in for
# CIFAR-10, chosen so that bird, cat and truck are each described by words the other seven use.
CLASS_ATTRIBUTES = {
    "airplane": ("machine", ("flying",), ("wings",), "in the sky"),
    "automobile": ("machine", ("small",), ("wheels",), "on a road"),
    "bird": ("animal", ("small", "flying"), ("wings",), "in the sky"),
    "cat": ("animal", ("small", "furry"), ("four legs",), "in a house"),
    "deer": ("animal", ("large", "brown"), ("four legs", "antlers"), "in a forest"),
    "dog": ("animal", ("furry",), ("four legs",), "in a house"),
    "frog": ("animal", ("small", "green"), ("four legs",), "in the water"),
    "horse": ("animal", ("large", "brown"), ("four legs",), "in a field"),
    "ship": ("machine", ("large",), (), "in the water"),
    "truck": ("machine", ("large",), ("wheels",), "on a road"),
}
PLACES = {(-1, -1): "at the top left", (0, -1): "at the top", (1, -1): "at the top right",
          (-1, 0): "on the left", (0, 0): "in the middle", (1, 0): "on the right",
          (-1, 1): "at the bottom left", (0, 1): "at the bottom", (1, 1): "at the bottom right"}


def prompt_templates(prompt: str) -> list[str]:
    """The templates of ``prompt``: one, or several separated by ``|`` (a prompt ensemble), each
    holding ``{}`` where the class name goes (ValueError naming the one that does not)."""
    templates = [t.strip() for t in prompt.split("|")]
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt must hold {{}} where the class name goes (in every |-separated template), "
                             f"got {t!r}")
    return templates


def class_prompt(prompt: str, name: str) -> str:
    """The first template of ``prompt`` with the class ``name`` in its ``{}`` (underscores read as
    spaces): the caption of an image of that class."""
    return prompt_templates(prompt)[0].format(name.replace("_", " "))


def class_prompts(prompt: str, classes: list[str]) -> list[str]:
    """Every template of ``prompt`` for every class, class-major (``[C * T]``): the texts whose mean
    embedding stands for each class in zero-shot classification (CLIP's prompt ensembling)."""
    return [t.format(c.replace("_", " ")) for c in classes for t in prompt_templates(prompt)]


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored image: the words left and right swapped."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in caption.split(" "))


def color_names(colors: Tensor) -> list[str]:
    """``[N, 3]`` RGB in [0, 1] -> the name of the nearest corner of the RGB cube."""
    corner = (colors > 0.5).long()
    return [COLOR_NAMES[i] for i in (4 * corner[:, 0] + 2 * corner[:, 1] + corner[:, 2]).tolist()]


def describe_shapes(labels: Tensor, attributes: dict) -> tuple[list[str], list[str]]:
    """Captions and colour names of shapes from :func:`gvit.data.shapes.make_shapes` (``attributes=True``)."""
    colors = color_names(attributes["color"])
    place = torch.where(attributes["center"] < -0.2, -1, torch.where(attributes["center"] > 0.2, 1, 0))
    captions = []
    for label, color, radius, (px, py) in zip(labels.tolist(), colors, attributes["radius"].tolist(), place.tolist()):
        size = "small" if radius < 0.525 else "large"  # radii are uniform in [0.35, 0.70]
        captions.append(f"a {size} {color} {SHAPE_CLASSES[label]} {PLACES[(px, py)]}")
    return captions, colors


class CaptionedShapes(InMemoryImages):
    """The built-in shapes with captions; see the module docstring. ``n`` images of ``split``
    (train: 4,096, test: 1,024 by default); train and test come from different seeds."""

    def __init__(self, split: str = "train", *, n: int | None = None, size: int = 32, seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"captioned shapes split must be train or test, got {split!r}")
        n = {"train": 4096, "test": 1024}[split] if n is None else n
        if n < 1:
            raise ValueError(f"captioned shapes: n must be >= 1, got {n}")
        base_seed = 1000 + seed * 2 + (split == "test")
        images, labels, captions, held_out = [], [], [], []
        batch, count = 0, 0
        while count < n:  # chunks of 512 (so the first images do not depend on n); train skips held-out pairs
            imgs, labs, _, attrs = make_shapes(512, size, seed=base_seed + 7919 * batch, attributes=True)
            caps, colors = describe_shapes(labs, attrs)
            out = torch.tensor([(SHAPE_CLASSES[lab], col) in HELD_OUT_PAIRS for lab, col in zip(labs.tolist(), colors)])
            keep = ~out if split == "train" else torch.ones_like(out)
            take = keep.nonzero().flatten()[: n - count]
            images.append(imgs[take])
            labels.append(labs[take])
            captions += [caps[i] for i in take.tolist()]
            held_out.append(out[take])
            count += len(take)
            batch += 1
        self.images, self.targets = torch.cat(images), torch.cat(labels)
        self.held_out = torch.cat(held_out)
        self.captions, self.classes = captions, list(SHAPE_CLASSES)


def describe_class(attributes: tuple, keep=None) -> str:
    """The description of a class from its :data:`CLASS_ATTRIBUTES` entry: "small furry animal with
    four legs in a house"; with ``keep`` (one bool per adjective, part and place, in that order) only
    the attributes kept, the noun always."""
    noun, adjectives, parts, place = attributes
    n = len(adjectives) + len(parts) + 1
    flags = [True] * n if keep is None else list(keep)[:n]
    if len(flags) < n:
        raise ValueError(f"describe_class: {n} keep flags needed for {attributes}, got {len(flags)}")
    kept_parts = [p for p, k in zip(parts, flags[len(adjectives):]) if k]
    text = " ".join([a for a, k in zip(adjectives, flags) if k] + [noun])
    return text + (f" with {' and '.join(kept_parts)}" if kept_parts else "") + (f" {place}" if flags[n - 1] else "")


class ClassCaptions(torch.utils.data.Dataset):
    """A labelled dataset (``(image, label)`` items, ``classes``, ``labels``) captioned by
    ``prompt.format(class name)``."""

    def __init__(self, dataset, prompt: str = DEFAULT_PROMPT):
        prompt_templates(prompt)  # checked
        self.dataset, self.prompt, self.classes = dataset, prompt, list(dataset.classes)
        self.class_texts = list(self.classes)
        self.targets = dataset_labels(dataset)
        self.captions = [class_prompt(prompt, self.classes[t]) for t in self.targets.tolist()]
        self.held_out = None

    @property
    def labels(self) -> Tensor:
        return self.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


class AttributeCaptions(ClassCaptions):
    """A labelled dataset captioned by its classes' attributes (``attributes``: class name -> entry as
    in :data:`CLASS_ATTRIBUTES`, which is the default). Image i's caption is ``prompt`` (its first
    template) with a random part of its class's description: the noun always, each adjective, part and
    the place with probability 1/2, drawn from ``seed`` and i (the same captions in every run).
    ``class_texts`` are the full descriptions, what zero-shot prompts name the classes by. A class
    without attributes is a ValueError naming it."""

    def __init__(self, dataset, prompt: str = DEFAULT_PROMPT, *, attributes: dict | None = None, seed: int = 0):
        super().__init__(dataset, prompt)
        table = CLASS_ATTRIBUTES if attributes is None else attributes
        missing = [c for c in self.classes if c not in table]
        if missing:
            raise ValueError(f"captions=attributes: no attributes for the classes {', '.join(missing)} (known: "
                             f"{', '.join(table)})")
        entries = [table[c] for c in self.classes]
        self.class_texts = [describe_class(e) for e in entries]
        slots = max(len(e[1]) + len(e[2]) + 1 for e in table.values())  # coin flips per image: the most any class needs
        keep = torch.rand(len(self.targets), slots, generator=torch.Generator().manual_seed(seed)) < 0.5
        self.captions = [class_prompt(prompt, describe_class(entries[t], keep[i].tolist()))
                         for i, t in enumerate(self.targets.tolist())]


class CaptionFile(torch.utils.data.Dataset):
    """Image-caption pairs listed in a ``.jsonl`` or ``.tsv`` file (see the module docstring). The
    listing is checked when opened (every line parsed, every image file present); images are read
    (:func:`gvit.data.images.read_image`) when indexed, at their own size. ``targets`` is -1 (no
    classes)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.suffix not in (".jsonl", ".tsv"):
            raise ValueError(f"{path}: a caption file is .jsonl or .tsv")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the caption file ({exc})") from None
        self.files, self.captions = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not JSON ({exc.msg})") from None
                if not isinstance(item, dict) or not isinstance(item.get("image"), str) \
                        or not isinstance(item.get("caption"), str):
                    raise ValueError(f'{where}: expected {{"image": path, "caption": text}}')
                image, caption = item["image"], item["caption"]
            else:
                image, tab, caption = line.partition("\t")
                if not tab:
                    raise ValueError(f"{where}: expected path<TAB>caption")
            if not caption.strip():
                raise ValueError(f"{where}: empty caption")
            file = path.parent / image
            if not file.is_file():
                raise ValueError(f"{where}: image {file} not found")
            self.files.append(file)
            self.captions.append(caption.strip())
        if not self.files:
            raise ValueError(f"{path}: no image-caption pairs")
        self.classes: list[str] = []
        self.targets = torch.full((len(self.files),), -1, dtype=torch.long)
        self.held_out = None

    @property
    def labels(self) -> Tensor:
        return self.targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return read_image(self.files[i]), -1
