"""The in-memory dataset shape shared by CIFAR and the procedural shapes."""

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

    def __getitem__(self, i: int):
        image = self.images[i]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return image, int(self.targets[i])
