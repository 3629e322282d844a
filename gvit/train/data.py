"""What a training step reads: seeded batches of indices, image batches, the per-step random
generator, and the datasets of a config.

Reproducibility: the data order, the augmentation and g0 of step s come from generators seeded by
(seed, s) (:func:`step_generator`, :class:`StepBatches`), drawn for the whole global batch and then
sliced by rank, so a run resumed from a checkpoint ends with exactly the weights of an
uninterrupted run and does not depend on the number of processes.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor

from ..data import AttributeCaptions, CaptionFile, ClassCaptions, Subset, open_dataset, spread_indices
from ..data.datasets import every_nth_of_each_class
from ..data.shards import ShardDataset
from ..data.transforms import resize_square
from ..gaussians import ANGLE, POS

__all__ = ["StepBatches", "step_generator", "image_collate", "limit", "split_name", "image_datasets", "shard_datasets",
           "folder_splits", "carve_folder",
           "flip_gaussians", "CaptionItems", "caption_datasets", "caption_collate", "dataset_captions",
           "hold_out_classes", "with_captions", "class_texts", "unseen_classes"]


def step_generator(seed: int, index: int) -> torch.Generator:
    """The generator of step (or shard) ``index`` of a run seeded with ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class StepBatches(torch.utils.data.Sampler):
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


def image_collate(size: int):
    """Collate ``(image, label)`` items into ``[B, 3, size, size]`` images and ``[B]`` labels."""
    def collate(items):
        images = [resize_square(img, size) for img, _ in items]
        return torch.stack(images), torch.tensor([label for _, label in items], dtype=torch.long)

    return collate


def limit(ds, n: int | None):
    """The whole dataset, or ``n`` images evenly spread over it (balanced for class-sorted folders)."""
    if ds is None or n is None or n >= len(ds):
        return ds
    return Subset(ds, spread_indices(len(ds), n))


def split_name(ds, default: str) -> str:
    """The split ``ds`` holds, seen through a :func:`limit`: a Gaussian folder's own (its ``split``),
    else ``default`` (the config's ``eval_split``)."""
    return getattr(ds, "split", None) or getattr(getattr(ds, "dataset", None), "split", None) or default


def image_datasets(cfg) -> tuple:
    """``(train, test or None)`` images of ``cfg.data`` (the test split may not exist)."""
    train = open_dataset(cfg.data, cfg.train_split, val_every=cfg.val_every)
    try:
        test = open_dataset(cfg.data, cfg.eval_split, val_every=cfg.val_every)
    except (FileNotFoundError, ValueError):
        if cfg.eval_split == "val":  # asked for by name: say why there is none
            raise
        test = None
    return train, test


def shard_datasets(cfg) -> tuple:
    """``(train, evaluation or None)`` Gaussian shard folders of an offline run (:func:`folder_splits`)."""
    return folder_splits(cfg, lambda folder, train: ShardDataset(folder, cfg.scale_factor))


def folder_splits(cfg, open_folder) -> tuple:
    """``(train, evaluation or None)`` of a run on Gaussian folders (``offline_train``, ``offline_eval``).

    ``open_folder(folder, train)`` opens one as a dataset with ``targets``, ``indices`` (dataset
    indices), ``split``, ``manifest`` and ``select(positions)``. With ``val_every`` > 0 and an
    ``offline_train`` fitted from the whole train split, every ``val_every``-th image of each class (in
    dataset order, as image datasets carve theirs) is the val split and leaves training. ``eval_split=val``
    evaluates on ``offline_eval`` when that folder holds val images, else on that carved part; with neither,
    it is a ValueError. Otherwise the evaluation is ``offline_eval`` as it is.
    """
    train = open_folder(cfg.offline_train, True)
    settings = train.manifest.get("settings") or {}
    carvable = cfg.val_every > 0 and settings.get("split") == "train" and not settings.get("val_every")
    if carvable:
        train = carve_folder(train, "train", cfg.val_every)
    if cfg.eval_split == "val":
        evaluation = open_folder(cfg.offline_eval, False) if cfg.offline_eval else None
        if evaluation is not None and evaluation.split == "val":
            return train, evaluation
        if not carvable:
            raise ValueError(f"config: eval_split=val, but offline_eval is not a folder of val images and "
                             f"offline_train ({cfg.offline_train}, split {settings.get('split')!r}"
                             f"{', val_every ' + str(settings['val_every']) if settings.get('val_every') else ''}) "
                             f"cannot be carved: set val_every > 0 with a folder fitted from the whole train split, "
                             f"or fit a val folder (gvit fit-dataset --split val --val-every N) as offline_eval")
        return train, carve_folder(open_folder(cfg.offline_train, False), "val", cfg.val_every)
    return train, open_folder(cfg.offline_eval, False) if cfg.offline_eval else None


def carve_folder(ds, split: str, every: int):
    """``val``: every ``every``-th image of each class of a Gaussian folder's dataset ``ds``, in dataset-index
    order; ``train``: the others. Its ``split`` says which."""
    order = sorted(range(len(ds)), key=lambda i: ds.indices[i])
    marks = every_nth_of_each_class([int(ds.targets[i]) for i in order], every)
    chosen = sorted(i for i, is_val in zip(order, marks) if is_val == (split == "val"))
    if not chosen:
        raise ValueError(f"Gaussian folder: no {split} images after holding out every {every}th image of each class")
    out = ds.select(chosen)
    out.split = split
    return out


def flip_gaussians(raw: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right the raw Gaussian sets where ``flip`` ``[B]`` is True: x -> -x, angle -> -angle."""
    mirrored = raw.clone()
    mirrored[..., POS.start] = -mirrored[..., POS.start]  # x
    mirrored[..., ANGLE] = -mirrored[..., ANGLE]
    return torch.where(flip[:, None, None], mirrored, raw)


class CaptionItems(torch.utils.data.Dataset):
    """A captioned dataset (``(image, caption)`` items, ``targets``) as ``((image, caption), target)``
    items, the loop's ``(inputs, label)`` shape."""

    def __init__(self, dataset):
        self.dataset, self.captions, self.targets = dataset, list(dataset.captions), torch.as_tensor(dataset.targets)
        self.classes = list(dataset.classes)
        self.class_texts = list(getattr(dataset, "class_texts", None) or self.classes)
        self.held_out = getattr(dataset, "held_out", None)
        self.unseen: list[int] = []

    def select(self, indices: list[int]) -> "CaptionItems":
        """The items at ``indices``, with their captions, targets and held-out marks."""
        out = copy.copy(self)
        out.dataset = Subset(self.dataset, indices)
        out.captions = [self.captions[i] for i in indices]
        out.targets = self.targets[indices]
        out.held_out = None if self.held_out is None else self.held_out[indices]
        return out

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, _ = self.dataset[i]
        return (image, self.captions[i]), int(self.targets[i])


def hold_out_classes(dataset, names: list[str], *, train: bool):
    """Classes kept out of training (zero-shot on classes no caption named): for ``train``, ``dataset``
    less every item of the classes ``names``; for evaluation, ``dataset`` with ``held_out`` marking
    those items (replacing any marks it had) and ``unseen`` their class indices. ``dataset`` is a
    :class:`CaptionItems` or another dataset with ``classes``, ``targets``, ``held_out`` and
    ``select(indices)``; ``names`` empty: ``dataset`` itself. A name that is not a class is a ValueError."""
    if not names:
        return dataset
    unknown = [name for name in names if name not in dataset.classes]
    if unknown:
        raise ValueError(f"config: unseen_classes {', '.join(unknown)} not among the classes "
                         f"({', '.join(dataset.classes)})")
    unseen = [dataset.classes.index(name) for name in names]
    is_unseen = torch.isin(torch.as_tensor(dataset.targets), torch.tensor(unseen))
    if train:
        return dataset.select((~is_unseen).nonzero().flatten().tolist())
    out = copy.copy(dataset)  # the same items, marked
    out.held_out, out.unseen = is_unseen, unseen
    return out


def dataset_captions(ds) -> tuple[list[str], Tensor, Tensor | None]:
    """Captions, targets and held-out marks (or None) of a :class:`CaptionItems` or a subset of one."""
    if isinstance(ds, Subset):
        captions, targets, held_out = dataset_captions(ds.dataset)
        return (
            [captions[i] for i in ds.indices],
            targets[ds.indices],
            None if held_out is None else held_out[ds.indices],
        )
    return list(ds.captions), torch.as_tensor(ds.targets), ds.held_out


def _captioned(ds):
    """The captioned dataset under any subsets of it."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def class_texts(ds) -> list[str]:
    """What zero-shot prompts call each class of a captioned dataset or a subset of one: its
    ``class_texts`` (names or descriptions), else its ``classes`` ([] without classes)."""
    return list(getattr(_captioned(ds), "class_texts", None) or getattr(ds, "classes", None) or [])


def unseen_classes(ds) -> list[int]:
    """The class indices a captioned dataset (or a subset of one) marks as held out of training."""
    return list(getattr(_captioned(ds), "unseen", None) or [])


def caption_datasets(cfg) -> tuple:
    """``(train, test or None)`` images with captions (:mod:`gvit.data.captions`): a dataset with
    captions of its own (``captioned-shapes``; ``shapes`` is read as it), a ``.jsonl`` / ``.tsv``
    file a caption file (no test split), anything else :func:`gvit.data.open_dataset`'s images
    captioned by ``cfg.prompt``."""
    if cfg.data.endswith((".jsonl", ".tsv")):
        return CaptionItems(CaptionFile(cfg.data)), None
    data = f"captioned-{cfg.data}" if cfg.data.partition(":")[0] == "shapes" else cfg.data
    train, test = image_datasets(replace(cfg, data=data))
    train = hold_out_classes(CaptionItems(with_captions(train, cfg)), cfg.unseen(), train=True)
    return train, None if test is None else hold_out_classes(CaptionItems(with_captions(test, cfg)), cfg.unseen(),
                                                              train=False)


def with_captions(dataset, cfg):
    """``dataset`` itself when it has captions, else its images captioned as ``cfg.captions`` says
    (by the class ``cfg.prompt``, or by attributes)."""
    if hasattr(dataset, "captions"):
        return dataset
    if cfg.captions == "attributes":
        return AttributeCaptions(dataset, cfg.prompt)
    return ClassCaptions(dataset, cfg.prompt)


def caption_collate(size: int):
    """Collate ``((image, caption), label)`` items into ``([B, 3, size, size] images, captions)`` and labels."""
    def collate(items):
        images = torch.stack([resize_square(img, size) for (img, _), _ in items])
        return (images, [caption for (_, caption), _ in items]), torch.tensor([t for _, t in items], dtype=torch.long)

    return collate
