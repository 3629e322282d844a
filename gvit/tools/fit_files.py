"""``gvit fit``: image files -> Gaussian files, renders, overlays and one ``metrics.csv``.

:func:`fit_files` writes, per image, ``<name>.gaussians.safetensors``, ``<name>.recon.png`` (the
render), ``<name>.overlay.png`` (2-sigma ellipses over the image) and one ``metrics.csv``. The job
is resumable: outputs are written atomically, and a rerun skips the images that are done (a metrics
row and a Gaussian file that loads and is valid; anything else is fitted again). The output folder
may not overlap the inputs and is locked while the job writes (:func:`gvit.files.output_folder`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..data import IMAGE_EXTENSIONS, ImageReadError, image_size, read_or_skip
from ..data.shards import storage_dtype
from ..distributed import device_for
from ..fit import FitConfig, auto_batch_size, fit_gaussians
from ..files import original_name, output_folder
from ..gaussians import compact, load_gaussians, save_gaussians
from ..progress import progress_bar
from ..viz import draw_ellipses, save_png, to_uint8
from .artifacts import write_csv

__all__ = ["collect_images", "fit_files", "METRIC_FIELDS"]

METRIC_FIELDS = ("name", "file", "height", "width", "count", "psnr", "ssim", "bytes", "compression", "seconds", "iters")


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
    with open(path, newline="", encoding="utf-8") as f:  # names as write_text wrote them
        return {original_name(row["name"]): row for row in csv.DictReader(f) if row.get("name")}


def _write_metrics(path: Path, rows: dict[str, dict]) -> None:
    write_csv(path, list(METRIC_FIELDS), [rows[name] for name in sorted(rows)])


def fit_files(inputs: list[str | os.PathLike], out: str | os.PathLike, config: FitConfig, *,
              batch_size: int | None = None, dtype: str = "float32", skip_bad: bool = False, overwrite: bool = False,
              pictures: bool = True, device: str = "auto", progress: bool = True, log=print) -> dict:
    """Fit Gaussians to image files (see the module docstring for what is written).

    Images are fitted on ``device`` (``auto``: the GPU when there is one) and written from the CPU.
    Images of the same size are fitted together, ``batch_size`` at a time (default: chosen from
    the image size, k and free memory by :func:`gvit.fit.auto_batch_size`), and read only when
    their batch comes (memory stays bounded for any number of files). Every file's header is
    checked first: a file that is not an image raises :class:`~gvit.data.ImageReadError` naming
    it before anything is fitted (one whose pixels turn out corrupt raises when its batch is
    read; finished images are kept). With ``skip_bad`` such files are skipped and listed in the
    summary instead. Images whose Gaussian file exists are skipped unless ``overwrite``. Returns a
    summary dict (counts, mean PSNR, skipped files, seconds).
    """
    torch_dtype = storage_dtype(dtype)[0]
    if torch_dtype is None:
        raise ValueError(f"dtype {dtype!r}: gvit fit stores float32 or float16; use gvit encode for coded images")
    where = device_for(device, "--device")
    out = Path(out)
    jobs = collect_images(inputs)
    if not jobs:
        raise ValueError(
            f"no images found in {', '.join(map(str, inputs))} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    settings = {"fit": config.to_dict(), "dtype": dtype}
    with output_folder(out, "fit", settings=settings, inputs=inputs, overwrite=overwrite, continues=True):
        return _fit_files(jobs, out, config, torch_dtype, batch_size, skip_bad, overwrite, pictures,
                          where, progress, log)


def _finished(out: Path, name: str, rows: dict[str, dict]) -> bool:
    """An image is done when its metrics row exists and its Gaussian file loads and is valid."""
    path = out / f"{name}.gaussians.safetensors"
    if name not in rows or not path.is_file():
        return False
    try:
        load_gaussians(path)
    except ValueError:
        return False
    return True


def _write_batch(out: Path, x, res, names, sources, config: FitConfig, torch_dtype, pictures: bool,
                 rows: dict, metrics_path: Path) -> None:
    """One fitted batch's files: pictures and Gaussian files, then its metrics rows (the only
    writer of ``rows`` and metrics.csv while the job runs)."""
    h, w = x.shape[2:]
    for i, name in enumerate(names):
        g = compact(res.gaussians[i:i + 1])
        count = int(g.counts()[0])
        meta = {"height": h, "width": w, "source": str(sources[name]), "psnr": f"{float(res.psnr[i]):.4f}",
                "scale_factor": config.scale_factor, "fit_config": json.dumps(res.config.to_dict())}  # as it ran
        if pictures:
            save_png(out / f"{name}.recon.png", to_uint8(res.rendered[i]))
            save_png(out / f"{name}.overlay.png", draw_ellipses(x[i], g))
        path = out / f"{name}.gaussians.safetensors"
        save_gaussians(path, g, dtype=torch_dtype, metadata=meta)
        stored = path.stat().st_size  # measured: the file's bytes, header and metadata included
        rows[name] = {"name": name, "file": str(sources[name]), "height": h, "width": w, "count": count,
                      "psnr": f"{float(res.psnr[i]):.3f}", "ssim": f"{float(res.ssim[i]):.5f}",
                      "bytes": stored, "compression": f"{3 * h * w / stored:.3f}",
                      "seconds": f"{res.seconds / len(names):.3f}", "iters": int(res.iters[i])}
    _write_metrics(metrics_path, rows)


def _fit_files(jobs, out: Path, config: FitConfig, torch_dtype, batch_size: int | None, skip_bad: bool,
               overwrite: bool, pictures: bool, device: torch.device, progress: bool, log) -> dict:
    bad: list[str] = []
    done = 0
    metrics_path = out / "metrics.csv"
    rows = _read_metrics(metrics_path)
    by_size: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for path, name in jobs:
        if not overwrite and _finished(out, name, rows):
            done += 1
            continue
        try:
            by_size.setdefault(image_size(path), []).append((path, name))
        except ImageReadError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
    batches = []
    for (h, w), group in by_size.items():
        size = batch_size or auto_batch_size(h, w, config.num_gaussians, device)
        batches += [group[i:i + size] for i in range(0, len(group), size)]
    bar = progress_bar(sum(len(b) for b in batches), desc="fitting", unit="img", enabled=progress)
    start = time.perf_counter()
    fitted: list[str] = []
    # Each batch's files are written by one background thread, in order, while the next batch is
    # fitted; its metrics rows go in last, so a kill leaves every listed image whole (the rest is redone).
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = []
        for batch in batches:
            pixels, names, sources = [], [], {}
            for path, name in batch:
                image = read_or_skip(path, skip_bad, bad)
                if image is None:
                    continue
                pixels.append(image)
                names.append(name)
                sources[name] = path
            if not names:
                continue
            x = torch.stack(pixels)
            res = fit_gaussians(x.to(device), config, progress=progress).to("cpu")
            pending.append(writer.submit(_write_batch, out, x, res, names, sources, config, torch_dtype,
                                         pictures, rows, metrics_path))
            fitted += names
            bar.update(len(batch))
            bar.set_postfix(psnr=f"{float(res.psnr.mean()):.2f}")
        for job in pending:
            job.result()  # re-raise a writing error here
    bar.close()
    fitted = [rows[n] for n in fitted]
    summary = {"fitted": len(fitted), "already_done": done, "skipped_bad": bad,
               "mean_psnr": sum(float(r["psnr"]) for r in fitted) / len(fitted) if fitted else float("nan"),
               "seconds": time.perf_counter() - start, "out": str(out)}
    for message in bad:
        log(f"skipped: {message}")
    return summary
