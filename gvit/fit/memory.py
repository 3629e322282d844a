"""How many images a fit can hold in memory: a fit's bytes per image, the batch size that uses a
quarter of the free memory, and the check that refuses a fit that cannot fit (before any work).
Free memory is the GPU's for a CUDA device, the machine's available pages otherwise."""

from __future__ import annotations

import os

import torch

from ..gaussians import RAW_DIM

__all__ = ["auto_batch_size", "check_memory"]


def _bytes_per_image(k: int, height: int, width: int) -> int:
    """A fit's memory per image: raw values, gradients, two Adam moments and the learning rates
    (k x 9 float32 each), and about eight image-sized float32 buffers (target, render, loss terms)."""
    return k * RAW_DIM * 4 * 6 + height * width * 3 * 4 * 8


def _free_bytes(device) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such query here
        return None


def auto_batch_size(height: int, width: int, k: int, device="cpu", *, most: int = 256) -> int:
    """How many images of ``height x width`` to fit together with ``k`` Gaussians: as many as use a
    quarter of the free memory, at most ``most`` (the CPU kernels gain little beyond), at least 1."""
    free = _free_bytes(device)
    if free is None:
        return min(most, 16)
    return max(1, min(most, free // 4 // _bytes_per_image(k, height, width)))


def check_memory(batch: int, k: int, height: int, width: int, device) -> None:
    """Refuse a fit whose parameters alone (values, gradients, two Adam moments, render buffers)
    would not fit in the memory there is, naming ``num_gaussians`` and the batch (before any work)."""
    need, have = batch * _bytes_per_image(k, height, width), _free_bytes(device)
    if have is not None and need > have:
        raise ValueError(f"num_gaussians={k} for a batch of {batch} images of {height}x{width} needs at least "
                         f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB free; use fewer Gaussians or "
                         f"a smaller batch")
