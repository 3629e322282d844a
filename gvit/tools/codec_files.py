"""``gvit encode`` and ``gvit decode``: image files <-> ``.gvc`` coded images.

:func:`encode_files` writes ``<name>.gvc`` per image and one ``codec.csv`` (bytes, bpp, PSNR and SSIM of
the decoded image, Gaussians, seconds); :func:`decode_files` renders ``.gvc`` files to PNGs at any scale.
Both claim their output folder (:func:`gvit.files.output_folder`), write every file atomically and skip
what a previous run finished, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..codec import EXTENSION, BitDepths, CodecError, decode_image, encode_image, read_header
from ..data import read_or_skip
from ..files import atomic_path, original_name, output_folder
from ..fit import FitConfig
from ..progress import progress_bar
from ..viz import save_png, to_uint8
from .artifacts import write_csv
from .fit_files import collect_images

__all__ = ["CODEC_FIELDS", "encode_files", "decode_files", "collect_coded"]

CODEC_FIELDS = ("name", "file", "height", "width", "count", "bytes", "bpp", "psnr", "ssim", "seconds")


def _rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:  # names as write_text wrote them
        return {original_name(row["name"]): row for row in csv.DictReader(f) if row.get("name")}


def _coded_ok(path: Path) -> bool:
    try:
        read_header(path.read_bytes())
    except (OSError, CodecError):
        return False
    return True


def encode_files(inputs: list[str | os.PathLike], out: str | os.PathLike, *, bpp: float | None = None,
                 num_gaussians: int | None = None, bits: BitDepths | None = None, fit: FitConfig | None = None,
                 skip_bad: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Code image files (see the module docstring). Exactly one of ``bpp`` (a target the file stays
    under) and ``num_gaussians``. Returns a summary: coded, already done, skipped files, mean bpp and PSNR."""
    if (bpp is None) == (num_gaussians is None):
        raise ValueError("give exactly one of --bpp and --num-gaussians")
    bits = bits or BitDepths()
    fit = fit or FitConfig()
    jobs = collect_images(inputs)
    if not jobs:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    out = Path(out)
    settings = {"bpp": bpp, "num_gaussians": num_gaussians, "bits": bits.as_tuple(), "fit": fit.to_dict()}
    with output_folder(out, "encode", settings=settings, inputs=inputs, overwrite=overwrite, continues=True):
        table = out / "codec.csv"
        rows = _rows(table)
        todo = [(p, n) for p, n in jobs if overwrite or n not in rows or not _coded_ok(out / f"{n}{EXTENSION}")]
        bad, coded = [], []
        bar = progress_bar(len(todo), desc="encoding", unit="img", enabled=progress)
        for path, name in todo:
            bar.update(1)
            image = read_or_skip(path, skip_bad, bad)
            if image is None:
                continue
            res = encode_image(image, bpp=bpp, num_gaussians=num_gaussians if bpp is None else None, bits=bits,
                               fit=fit)
            target = out / f"{name}{EXTENSION}"
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(res.data)
            h, w = image.shape[-2:]
            rows[name] = {"name": name, "file": str(path), "height": h, "width": w, "count": res.count,
                          "bytes": len(res.data), "bpp": f"{res.bpp:.4f}", "psnr": f"{res.psnr:.3f}",
                          "ssim": f"{res.ssim:.5f}", "seconds": f"{res.seconds:.2f}"}
            write_csv(table, list(CODEC_FIELDS), [rows[n] for n in sorted(rows)])  # the row after its file
            coded.append(rows[name])
        bar.close()
        for message in bad:
            log(f"skipped: {message}")
    mean = (lambda key: sum(float(r[key]) for r in coded) / len(coded)) if coded else (lambda key: float("nan"))
    return {"coded": len(coded), "already_done": len(jobs) - len(todo), "skipped_bad": bad, "mean_bpp": mean("bpp"),
            "mean_psnr": mean("psnr"), "out": str(out)}


def collect_coded(inputs: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``.gvc`` files and folders (searched recursively) -> ``(path, output name)`` pairs, as
    :func:`gvit.tools.fit_files.collect_images` names images."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, str(f.relative_to(p).with_suffix(""))) for f in sorted(p.rglob(f"*{EXTENSION}"))]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise FileNotFoundError(f"no such coded image or folder: {p}")
    return found


def decode_files(inputs: list[str | os.PathLike], out: str | os.PathLike, *, scale: float = 1.0,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Render ``.gvc`` files to ``<name>.png`` at ``scale`` x their size. A damaged file raises a
    ValueError naming it (the files decoded before it are kept)."""
    jobs = collect_coded(inputs)
    if not jobs:
        raise ValueError(f"no {EXTENSION} files found in {', '.join(map(str, inputs))}")
    out = Path(out)
    with output_folder(out, "decode", settings={"scale": scale}, inputs=inputs, overwrite=overwrite, continues=True):
        done = 0
        bar = progress_bar(len(jobs), desc="decoding", unit="img", enabled=progress)
        for path, name in jobs:
            bar.update(1)
            target = out / f"{name}.png"
            if target.is_file() and not overwrite:
                done += 1
                continue
            try:
                image = decode_image(path.read_bytes(), scale=scale)
            except CodecError as exc:
                raise ValueError(f"{path}: {exc}") from None
            save_png(target, to_uint8(image))
        bar.close()
    return {"decoded": len(jobs) - done, "already_done": done, "out": str(out)}
