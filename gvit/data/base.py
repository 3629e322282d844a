"""The in-memory dataset shape shared by CIFAR and the procedural shapes; subsets."""

from __future__ import annotations

import torch
from torch import Tensor


class InMemoryImages(torch.utils.data.Dataset):
    """``images`` ``[N, 3, H, W]`` (uint8 0..255 or float in [0, 1]) and ``targets`` ``[N]`` int64
    held in memory; items are ``(float32 image in [0, 1], int label)``."""

    images: Tensor
    targets: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def labels(self) -> Tensor:
        return self.targets

    def select(self, indices: list[int]) -> "InMemoryImages":
        """The items at ``indices`` as a dataset of the same class: every per-item field (images,
        targets, and where a dataset has them masks, captions, held-out marks) taken along."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        index = torch.as_tensor(indices, dtype=torch.long)
        n = len(self)
        for name, value in self.__dict__.items():
            if isinstance(value, Tensor) and value.ndim and len(value) == n:
                setattr(out, name, value[index])
            elif isinstance(value, list) and len(value) == n and name != "classes":
                setattr(out, name, [value[i] for i in indices])
        return out

    def __getitem__(self, i: int):
        image = self.images[i]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return image, int(self.targets[i])


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices evenly spread over ``range(total)`` (``i * total // n``), in order.

    Used wherever a run takes "n images of a split": datasets stored class by class (ImageFolder
    trees, e.g. the CIFAR-10 zips) would otherwise give only the first classes.
    """
    if n < 0 or total < 0:
        raise ValueError(f"need total >= 0 and n >= 0, got {total}, {n}")
    n = min(n, total)
    return [i * total // n for i in range(n)]


def dataset_labels(dataset) -> Tensor:
    """``[N]`` int64 labels of a dataset without decoding its images (``labels`` of gvit's datasets,
    through subsets)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.as_tensor(dataset.labels, dtype=torch.long)


def dataset_masks(dataset) -> Tensor | None:
    """``[N, H, W]`` object masks of a dataset that has them (the built-in shapes), through subsets;
    None otherwise."""
    if isinstance(dataset, torch.utils.data.Subset):
        masks = dataset_masks(dataset.dataset)
        return None if masks is None else masks[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return getattr(dataset, "masks", None)


class Subset(torch.utils.data.Subset):
    """A subset that keeps the dataset's ``classes``."""

    def __init__(self, dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.classes = getattr(dataset, "classes", None)
