"""``gvit fit-dataset``: a whole dataset -> Gaussian shards (:mod:`gvit.data.shards`), resumable and
``torchrun``-aware."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from ..data import ImageReadError, open_dataset, spread_indices
from ..codec import PROJECT_FROM, BitDepths, project
from ..data.shards import CODED, shard_done, shard_name, storage_dtype, write_manifest, write_shard
from ..distributed import barrier, device_for, launched_world, share_threads
from ..files import output_folder, record_settings
from ..fit import FitConfig, fit_gaussians
from ..gaussians import RAW_DIM, concat, decode
from ..progress import progress_bar

__all__ = ["fit_dataset"]


def fit_dataset(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig, *, split: str = "train",
                val_every: int = 0, shard_size: int = 1024, batch_size: int = 256, limit: int | None = None,
                dtype: str = "float16", skip_bad: bool = False, overwrite: bool = False, device: str = "auto",
                progress: bool = True, log=print) -> dict:
    """Convert a dataset (anything :func:`gvit.data.open_dataset` opens) into Gaussian shards.

    Shard s holds images ``[s * shard_size, (s + 1) * shard_size)`` of the split, or with ``limit``
    of the ``limit`` images evenly spread over it (:func:`gvit.data.spread_indices`, so folders
    stored class by class stay balanced); each shard records the dataset indices it holds.
    Images are fitted on ``device`` (``auto``: the GPU when there is one; under torchrun each
    process takes the GPU of its LOCAL_RANK). Finished shards are skipped on a rerun; the settings
    are recorded in ``settings.json`` and a rerun with different settings into the same folder is
    refused. Under ``torchrun`` each process takes every WORLD_SIZE-th shard and rank 0 writes
    ``manifest.json`` once all shards exist.
    With ``dtype="gvc"`` every image is stored as ``.gvc`` bytes (:mod:`gvit.codec`), fitted in one stage
    with the codec's quantisation over the second half of the steps.
    Unreadable images raise (naming the file), or with ``skip_bad`` are left out and listed in
    their shard's metadata and the manifest. Returns the manifest (rank 0) or a per-rank summary.
    """
    storage_dtype(dtype)  # refuse an unknown dtype before any work
    where = device_for(device, "--device")
    for name, value in (("--shard-size", shard_size), ("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dataset = open_dataset(data, split, val_every=val_every)
    order = range(len(dataset)) if limit is None else spread_indices(len(dataset), limit)
    n = len(order)
    if n < 1:
        raise ValueError(f"dataset {data} ({split}) has no images to convert")
    out = Path(out)
    rank, world, local_world = launched_world()
    settings = {"data": str(data), "split": split, "num_images": n, "shard_size": shard_size, "dtype": dtype,
                "fit": config.to_dict()} | ({"val_every": val_every} if val_every else {})  # as readers reopen it
    with contextlib.ExitStack() as stack:
        if rank == 0:  # one claim per launch; the other ranks write their shards under it
            stack.enter_context(output_folder(out, "fit-dataset", settings=settings, continues=True,
                                              overwrite=overwrite))
        return _convert(dataset, data, order, out, config, settings, split, shard_size, batch_size, dtype, skip_bad,
                        where, progress, log, (rank, world, local_world))


def _coded_projection(height: int, width: int):
    """The codec's projection for coded shards: the fit ends on the values the .gvc bytes hold."""
    bits = BitDepths()
    return lambda g: project(g, height, width, bits)


def _convert(dataset, data, order, out: Path, config: FitConfig, settings: dict, split: str, shard_size: int,
             batch_size: int, dtype: str, skip_bad: bool, device: torch.device, progress: bool, log,
             launch: tuple[int, int, int]) -> dict:
    n = len(order)
    rank, world, local_world = launch
    record_settings(out / "settings.json", settings, write=rank == 0)
    if world > 1:
        share_threads(local_world)
    n_shards = -(-n // shard_size)
    mine = [s for s in range(rank, n_shards, world) if not shard_done(out / shard_name(s))]
    todo = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine)
    bar = progress_bar(todo, desc=f"fit-dataset rank {rank}/{world}" if world > 1 else "fit-dataset", unit="img",
                       enabled=progress)
    start = time.perf_counter()
    for s in mine:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        images, labels, indices, bad = [], [], [], []
        for i in (order[p] for p in range(lo, hi)):
            try:
                img, label = dataset[i]
            except ImageReadError as exc:
                if not skip_bad:
                    raise
                bad.append({"index": i, "error": str(exc)})
                continue
            images.append(img)
            labels.append(label)
            indices.append(i)
        sizes = sorted({tuple(img.shape[1:]) for img in images})
        if len(sizes) > 1:
            raise ValueError(f"dataset {data}: shard {s} mixes image sizes {sizes}; fit-dataset needs "
                             "one size per dataset (use gvit fit for folders of photos)")
        parts = []
        projection = _coded_projection(*images[0].shape[1:]) if dtype == CODED and images else None
        for b in range(0, len(images), batch_size):
            res = fit_gaussians(torch.stack(images[b:b + batch_size]).to(device), config, progress=False,
                                project=projection, project_from=PROJECT_FROM).to("cpu")
            parts.append(res)
            bar.update(len(res.psnr))
            bar.set_postfix(shard=s, psnr=f"{float(res.psnr.mean()):.2f}")
        if parts:
            h, w = images[0].shape[1:]
            gaussians, psnr = concat([p.gaussians for p in parts]), torch.cat([p.psnr for p in parts])
        else:  # every image of the shard is unreadable (and skipped): an empty shard records that it is done
            h = w = 0
            gaussians = decode(torch.zeros(0, config.num_gaussians, RAW_DIM), config.scale_factor)
            psnr = torch.zeros(0)
        write_shard(out, s, gaussians, torch.tensor(labels, dtype=torch.long), indices=indices, psnr=psnr,
                    height=h, width=w, scale_factor=config.scale_factor, dtype=dtype, skipped=bad, start=lo, stop=hi,
                    split=split, data=str(data), rank=rank)
    bar.close()
    seconds = time.perf_counter() - start
    if world > 1 and torch.distributed.is_available():
        barrier()
    missing = [s for s in range(n_shards) if not (out / shard_name(s)).is_file()]
    if rank != 0:
        return {"rank": rank, "shards": len(mine), "seconds": seconds}
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:10]} are missing after this run")
    manifest = write_manifest(out, n_shards, settings,
                              classes=list(getattr(dataset, "classes", [])) or None, seconds_this_run=seconds)
    for item in manifest["skipped"]:
        log(f"skipped image {item['index']}: {item['error']}")
    return manifest
