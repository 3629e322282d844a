"""Turning image files and whole datasets into Gaussian files (the jobs behind ``gvit fit`` and
``gvit fit-dataset``).

Both jobs are resumable: outputs are written atomically and a rerun with the same settings skips
what is already on disk.

* :func:`fit_files` writes, per image, ``<name>.gaussians.safetensors``, ``<name>.recon.png``
  (the render), ``<name>.overlay.png`` (2-sigma ellipses over the image) and one ``metrics.csv``.
* :func:`fit_dataset` writes ``shard-NNNNN.safetensors`` files of ``shard_size`` consecutive
  dataset images (Gaussians padded to the shard's largest count with a ``valid`` mask when
  pruning, labels, and the dataset index range in the metadata), then ``manifest.json``. Shards
  are dealt round-robin to the processes of a ``torchrun`` launch.
  :func:`load_shards` reads them back in dataset order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from ._io import write_json, write_text
from .data import IMAGE_EXTENSIONS, ImageReadError, image_size, open_dataset, read_image, spread_indices
from .fit import FitConfig, compact, compression_ratio, fit_gaussians
from .gaussians import Gaussians, load_gaussians, save_gaussians
from .viz import draw_ellipses, save_png, to_uint8

__all__ = ["collect_images", "fit_files", "fit_dataset", "load_shards", "read_manifest", "shard_name", "METRIC_FIELDS"]

METRIC_FIELDS = ("name", "file", "height", "width", "count", "psnr", "ssim", "bytes", "compression", "seconds", "iters")
_DTYPES = {"float32": (torch.float32, 4), "float16": (torch.float16, 2)}


def _dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# --------------------------------------------------------------------------- image files


def collect_images(inputs: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Expand files and folders (searched recursively) into ``(path, output name)`` pairs.

    The output name is the path relative to the folder it was found in, without its suffix
    (``photos/a/b.png`` found under ``photos`` -> ``a/b``); names that would collide get
    ``-2``, ``-3``, ... A missing input raises FileNotFoundError naming it.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            found += [(f, str(f.relative_to(p).with_suffix(""))) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    seen: dict[str, int] = {}
    out = []
    for path, name in found:
        n = seen.get(name, 0) + 1
        seen[name] = n
        out.append((path, name if n == 1 else f"{name}-{n}"))
    return out


def _read_metrics(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f) if row.get("name")}


def _write_metrics(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow({k: rows[name][k] for k in METRIC_FIELDS})
    write_text(path, buf.getvalue())


def fit_files(inputs: list[str | os.PathLike], out: str | os.PathLike, config: FitConfig, *,
              batch_size: int = 16, dtype: str = "float32", skip_bad: bool = False, overwrite: bool = False,
              pictures: bool = True, progress: bool = True, log=print) -> dict:
    """Fit Gaussians to image files (see the module docstring for what is written).

    Images of the same size are fitted together, ``batch_size`` at a time, and read only when
    their batch comes (memory stays bounded for any number of files). Every file's header is
    checked first: a file that is not an image raises :class:`~gvit.data.ImageReadError` naming
    it before anything is fitted (one whose pixels turn out corrupt raises when its batch is
    read; finished images are kept). With ``skip_bad`` such files are skipped and listed in the
    summary instead. Images whose Gaussian file exists are skipped unless ``overwrite``. Returns a
    summary dict (counts, mean PSNR, skipped files, seconds).
    """
    torch_dtype, nbytes = _dtype(dtype)
    out = Path(out)
    jobs = collect_images(inputs)
    if not jobs:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    bad: list[str] = []
    done = 0
    by_size: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for path, name in jobs:
        if not overwrite and (out / f"{name}.gaussians.safetensors").is_file():
            done += 1
            continue
        try:
            by_size.setdefault(image_size(path), []).append((path, name))
        except ImageReadError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
    metrics_path = out / "metrics.csv"
    rows = _read_metrics(metrics_path)
    batches = [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(b) for b in batches), desc="fitting", unit="img")
    start = time.perf_counter()
    fitted: list[str] = []
    for batch in batches:
        pixels, names, sources = [], [], {}
        for path, name in batch:
            try:
                pixels.append(read_image(path))
            except ImageReadError as exc:
                if not skip_bad:
                    raise
                bad.append(str(exc))
                continue
            names.append(name)
            sources[name] = path
        if not names:
            continue
        x = torch.stack(pixels)
        res = fit_gaussians(x, config, progress=progress)
        h, w = x.shape[2:]
        recon = res.rendered
        for i, name in enumerate(names):
            g = compact(res.gaussians[i:i + 1])
            count = int(g.counts()[0])
            meta = {"height": h, "width": w, "source": str(sources[name]), "psnr": f"{float(res.psnr[i]):.4f}",
                    "scale_factor": config.scale_factor, "fit_config": json.dumps(config.to_dict())}
            if pictures:
                save_png(out / f"{name}.recon.png", to_uint8(recon[i]))
                save_png(out / f"{name}.overlay.png", draw_ellipses(x[i], g))
            save_gaussians(out / f"{name}.gaussians.safetensors", g, dtype=torch_dtype, metadata=meta)
            rows[name] = {"name": name, "file": str(sources[name]), "height": h, "width": w, "count": count,
                          "psnr": f"{float(res.psnr[i]):.3f}", "ssim": f"{float(res.ssim[i]):.5f}",
                          "bytes": count * 9 * nbytes,
                          "compression": f"{float(compression_ratio(torch.tensor([count]), h, w, bytes_per_value=nbytes)):.3f}",
                          "seconds": f"{res.seconds / len(names):.3f}", "iters": int(res.iters[i])}
        _write_metrics(metrics_path, rows)
        fitted += names
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(psnr=f"{float(res.psnr.mean()):.2f}")
    if bar is not None:
        bar.close()
    fitted = [rows[n] for n in fitted]
    summary = {"fitted": len(fitted), "already_done": done, "skipped_bad": bad,
               "mean_psnr": sum(float(r["psnr"]) for r in fitted) / len(fitted) if fitted else float("nan"),
               "seconds": time.perf_counter() - start, "out": str(out)}
    for message in bad:
        log(f"skipped: {message}")
    return summary


# --------------------------------------------------------------------------- datasets


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local world size) from the torchrun environment (0, 1, 1 without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))


def _settings(data: str, split: str, n: int, shard_size: int, dtype: str, config: FitConfig) -> dict:
    return {"data": str(data), "split": split, "num_images": n, "shard_size": shard_size, "dtype": dtype,
            "fit": config.to_dict()}


def fit_dataset(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig, *, split: str = "train",
                shard_size: int = 1024, batch_size: int = 256, limit: int | None = None, dtype: str = "float16",
                skip_bad: bool = False, progress: bool = True, log=print) -> dict:
    """Convert a dataset (anything :func:`gvit.data.open_dataset` opens) into Gaussian shards.

    Shard s holds images ``[s * shard_size, (s + 1) * shard_size)`` of the split, or with ``limit``
    of the ``limit`` images evenly spread over it (:func:`gvit.data.spread_indices`, so folders
    stored class by class stay balanced); each shard records the dataset indices it holds.
    Finished shards are skipped on a rerun; the settings are recorded in ``settings.json`` and a rerun with different settings into the same folder is refused. Under
    ``torchrun`` each process takes every WORLD_SIZE-th shard and rank 0 writes ``manifest.json``
    once all shards exist. Unreadable images raise (naming the file), or with ``skip_bad`` are
    left out and listed in their shard's metadata and the manifest. Returns the manifest (rank 0)
    or a per-rank summary.
    """
    _, nbytes = _dtype(dtype)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    dataset = open_dataset(data, split)
    order = range(len(dataset)) if limit is None else spread_indices(len(dataset), limit)
    n = len(order)
    if n < 1:
        raise ValueError(f"dataset {data} ({split}) has no images to convert")
    out = Path(out)
    rank, world, local_world = _dist_info()
    settings = _settings(str(data), split, n, shard_size, dtype, config)
    settings_path = out / "settings.json"
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{out} holds shards made with other settings ({', '.join(diff)} differ); "
                             "use another --out or remove it")
    elif rank == 0:
        write_json(settings_path, settings)
    if world > 1:
        _set_threads(local_world)
    n_shards = -(-n // shard_size)
    mine = [s for s in range(rank, n_shards, world) if not (out / shard_name(s)).is_file()]
    bar = None
    if progress:
        from tqdm import tqdm

        todo = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine)
        bar = tqdm(total=todo, desc=f"fit-dataset rank {rank}/{world}" if world > 1 else "fit-dataset", unit="img")
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
        parts = []
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[1:]), []).append(j)
        if len(by_size) > 1:
            raise ValueError(f"dataset {data}: shard {s} mixes image sizes {sorted(by_size)}; fit-dataset needs "
                             "one size per dataset (use gvit fit for folders of photos)")
        for b in range(0, len(images), batch_size):
            res = fit_gaussians(torch.stack(images[b:b + batch_size]), config, progress=False)
            parts.append(res)
            if bar is not None:
                bar.update(len(res.psnr))
                bar.set_postfix(shard=s, psnr=f"{float(res.psnr.mean()):.2f}")
        if not parts:
            raise ValueError(f"dataset {data}: every image of shard {s} is unreadable")
        g = _concat([p.gaussians for p in parts])
        psnr = torch.cat([p.psnr for p in parts])
        h, w = images[0].shape[1:]
        meta = {"height": h, "width": w, "shard": s, "start": lo, "stop": hi, "indices": json.dumps(indices),
                "skipped": json.dumps(bad), "psnr": json.dumps([round(float(v), 3) for v in psnr]),
                "scale_factor": config.scale_factor, "split": split, "data": str(data), "rank": rank}
        save_gaussians(out / shard_name(s), compact(g), labels=torch.tensor(labels), dtype=_DTYPES[dtype][0],
                       metadata=meta)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if world > 1 and torch.distributed.is_available():
        _barrier()
    missing = [s for s in range(n_shards) if not (out / shard_name(s)).is_file()]
    if rank != 0:
        return {"rank": rank, "shards": len(mine), "seconds": seconds}
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:10]} are missing after this run")
    manifest = _manifest(out, n_shards, settings, nbytes, list(getattr(dataset, "classes", [])) or None)
    manifest["seconds_this_run"] = seconds
    write_json(out / "manifest.json", manifest)
    for item in manifest["skipped"]:
        log(f"skipped image {item['index']}: {item['error']}")
    return manifest


def _concat(sets: list[Gaussians]) -> Gaussians:
    """Concatenate Gaussian batches along B (same k; valid masks kept or made all-True)."""
    valid = None
    if any(g.valid is not None for g in sets):
        valid = torch.cat([g.valid if g.valid is not None else torch.ones(g.means.shape[:2], dtype=torch.bool)
                           for g in sets])
    return Gaussians(*(torch.cat([getattr(g, f) for g in sets]) for f in
                       ("means", "scales", "angles", "colors", "opacities")), valid=valid)


def _manifest(out: Path, n_shards: int, settings: dict, nbytes: int, classes: list[str] | None) -> dict:
    counts, psnrs, skipped = [], [], []
    for s in range(n_shards):
        g, labels, meta = load_gaussians(out / shard_name(s))
        counts.append(g.counts())
        psnrs += json.loads(meta["psnr"])
        skipped += json.loads(meta["skipped"])
        h, w = int(meta["height"]), int(meta["width"])
    counts = torch.cat(counts).double()
    return {"format": "gvit.gaussian-shards", "version": "1", "shards": [shard_name(s) for s in range(n_shards)],
            "num_images": int(len(counts)), "height": h, "width": w, "classes": classes,
            "mean_count": float(counts.mean()), "mean_psnr": sum(psnrs) / len(psnrs),
            "compression_vs_8bit": float(compression_ratio(counts, h, w, bytes_per_value=nbytes).mean()),
            "skipped": skipped, "settings": settings}


def _set_threads(local_world: int) -> None:
    """Share the machine's cores among the processes of one node."""
    import numba

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_world)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _barrier() -> None:
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def read_manifest(folder: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a finished :func:`fit_dataset` folder (ValueError naming the folder
    when it is missing)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no manifest.json (the conversion has not finished; rerun it to resume)")
    return json.loads(path.read_text())


def load_shards(folder: str | os.PathLike) -> tuple[Gaussians, Tensor, Tensor, dict]:
    """Read a folder written by :func:`fit_dataset`: ``(gaussians, labels, indices, manifest)`` in
    dataset order, Gaussians padded to the largest count with a ``valid`` mask (None if no
    shard has one). Raises ValueError naming the folder if it is incomplete."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    sets, labels, indices = [], [], []
    for name in manifest["shards"]:
        g, lab, meta = load_gaussians(folder / name)
        sets.append(g)
        labels.append(lab)
        indices.append(torch.tensor(json.loads(meta["indices"]), dtype=torch.long))
    kmax = max(g.num_gaussians for g in sets)
    padded = [_pad(g, kmax) for g in sets]
    g = _concat(padded)
    if all(s.valid is None for s in sets) and all(s.num_gaussians == kmax for s in sets):
        g.valid = None
    return g, torch.cat(labels), torch.cat(indices), manifest


def _pad(g: Gaussians, k: int) -> Gaussians:
    """Pad a batch to k Gaussians per set with invalid slots."""
    extra = k - g.num_gaussians
    valid = g.valid if g.valid is not None else torch.ones(g.means.shape[:2], dtype=torch.bool)
    if extra == 0:
        return Gaussians(g.means, g.scales, g.angles, g.colors, g.opacities, valid)

    def pad(t: Tensor, fill: float) -> Tensor:
        return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), fill)], 1)

    return Gaussians(pad(g.means, 0.0), pad(g.scales, 1e-3), pad(g.angles, 0.0), pad(g.colors, 0.0),
                     pad(g.opacities, 0.0), torch.cat([valid, valid.new_zeros(valid.shape[0], extra)], 1))

