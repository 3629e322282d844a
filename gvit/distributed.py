"""Processes launched by ``torchrun``: rank and world size, the process group, sharing a node's cores.

Used by training (data parallel, gradients averaged with one flat all-reduce) and by
``gvit fit-dataset`` (shards dealt round-robin). Without ``torchrun`` everything is rank 0 of 1.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["device_for", "rank_world", "launched_world", "init_process_group", "all_ranks", "all_reduce_grads",
           "share_threads", "barrier"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group, or (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local world size) from the torchrun environment ((0, 1, 1) without one)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def device_for(name: str, what: str = "device") -> torch.device:
    """The device a job named ``name`` runs on: ``auto`` is CUDA when available, else the CPU; under
    torchrun a CUDA job takes the GPU of its LOCAL_RANK. ``cuda`` without a GPU raises, naming ``what``."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{what}: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}=cuda but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device: torch.device) -> None:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)


def _joined() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces CUDA tensors only, gloo takes CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank."""
    if not _joined():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce)."""
    if not _joined():
        return
    world = rank_world()[1]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def share_threads(local_world: int) -> None:
    """Share the machine's cores among the ``local_world`` processes of one node (torch and numba)."""
    import numba

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_world)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def barrier() -> None:
    """Wait for every process of the launch (joins a gloo group for the moment when none is joined)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
