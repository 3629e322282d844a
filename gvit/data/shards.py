"""Folders of Gaussian shards: what ``gvit fit-dataset`` writes, the leakage tests write for an
encoder's Gaussians, and offline training reads. One writer, one reader, one manifest.

A folder holds ``shard-NNNNN.safetensors`` files (Gaussian files of :mod:`gvit.gaussians` with
labels; Gaussians padded to the shard's largest count with a ``valid`` mask when sets differ in
size; or, with ``dtype="gvc"``, every image's ``.gvc`` coded bytes of :mod:`gvit.codec` end to end,
with their offsets and the labels) and, once every shard exists, ``manifest.json``. Each shard's
metadata records the dataset indices it holds, per-image PSNR, skipped images and the image size.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..codec import CodecError, encode_gaussians
from ..codec import decode as decode_coded
from ..files import read_safetensors, write_json, write_safetensors
from ..gaussians import (FILE_FORMAT, Gaussians, compact, concat, encode, gaussians_from_tensors, pad,
                         save_gaussians, valid_mask)

__all__ = ["SHARD_FORMAT", "CODED_FORMAT", "CODED", "DTYPES", "storage_dtype", "shard_name", "shard_done",
           "write_shard", "read_shard", "write_manifest", "read_manifest", "load_shards", "ShardDataset"]

SHARD_FORMAT, SHARD_VERSION = "gvit.gaussian-shards", "1"
CODED_FORMAT = "gvit.coded-shard"  # a shard of .gvc coded images
CODED = "gvc"
DTYPES = {"float32": (torch.float32, 4), "float16": (torch.float16, 2), CODED: (None, None)}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def storage_dtype(name: str) -> tuple[torch.dtype | None, int | None]:
    """``(torch dtype, bytes per value)`` of a storage dtype name (ValueError naming the allowed ones);
    ``(None, None)`` for ``gvc``, the coded form."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def write_shard(folder: str | os.PathLike, index: int, gaussians: Gaussians, labels: Tensor, *, indices: list[int],
                psnr: Tensor, height: int, width: int, scale_factor: float, dtype: str = "float32",
                skipped: list | None = None, **metadata) -> Path:
    """Write shard ``index`` of ``folder`` atomically (Gaussians compacted, ``dtype`` float32 / float16);
    ``metadata`` (e.g. ``data``, ``split``, ``source``) is recorded as strings. Returns its path."""
    path = Path(folder) / shard_name(index)
    meta = {"height": height, "width": width, "shard": index, "indices": json.dumps([int(i) for i in indices]),
            "skipped": json.dumps(skipped or []), "psnr": json.dumps([round(float(v), 3) for v in psnr]),
            "scale_factor": scale_factor, **metadata}
    if dtype != CODED:
        save_gaussians(path, compact(gaussians), labels=labels, dtype=storage_dtype(dtype)[0], metadata=meta)
        return path
    blobs = [encode_gaussians(compact(gaussians[i]), height, width) for i in range(gaussians.batch_size)]
    offsets = torch.tensor([0, *map(len, blobs)], dtype=torch.int64).cumsum(0)
    tensors = {"coded": torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()), "offsets": offsets,
               "labels": labels.detach().to("cpu", torch.int64).contiguous()}
    write_safetensors(path, tensors, file_format=CODED_FORMAT, version="1", metadata=meta)
    return path


def _read_coded(path, tensors: dict) -> tuple[Gaussians, Tensor]:
    """The Gaussians (padded, with ``valid``) and labels of a coded shard."""
    coded, offsets, labels = (tensors.get(k) for k in ("coded", "offsets", "labels"))
    if coded is None or offsets is None or labels is None or offsets.ndim != 1 or len(offsets) != len(labels) + 1 \
            or int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()) or int(offsets[-1]) != len(coded):
        raise ValueError(f"{path}: not a coded shard (coded bytes, offsets or labels missing or inconsistent)")
    data = coded.numpy().tobytes()
    sets = []
    for i in range(len(labels)):
        try:
            sets.append(decode_coded(data[int(offsets[i]):int(offsets[i + 1])]))
        except CodecError as exc:
            raise ValueError(f"{path}: image {i}: {exc}") from None
    if not sets:
        return Gaussians(*(torch.zeros(0, 0, *s) for s in ((2,), (2,), (), (3,), ()))), labels
    kmax = max(max(g.num_gaussians for g in sets), 1)
    g = concat([pad(s, kmax) for s in sets])
    return gaussians_from_tensors({"means": g.means, "scales": g.scales, "angles": g.angles, "colors": g.colors,
                                   "opacities": g.opacities, "valid": g.valid, "labels": labels}, source=str(path))


def read_shard(path: str | os.PathLike) -> tuple[Gaussians, Tensor, dict]:
    """``(gaussians, labels, metadata)`` of one shard, with ``indices``, ``psnr`` and ``skipped`` parsed."""
    tensors, meta = read_safetensors(path, file_format=(FILE_FORMAT, CODED_FORMAT), what="Gaussian shard")
    if meta["format"] == CODED_FORMAT:
        g, labels = _read_coded(path, tensors)
    else:
        g, labels = gaussians_from_tensors(tensors, source=str(path))
    for key in ("indices", "psnr", "skipped"):
        meta[key] = json.loads(meta.get(key, "[]"))
    if labels is None or len(meta["indices"]) != g.batch_size:
        raise ValueError(f"{path}: not a shard (labels or dataset indices missing)")
    return g, labels, meta


def shard_done(path: str | os.PathLike) -> bool:
    """Whether a shard is finished: its file exists and reads back as a valid shard (a corrupt or
    torn one is not, and is written again)."""
    if not Path(path).is_file():
        return False
    try:
        read_shard(path)
    except ValueError:
        return False
    return True


def write_manifest(folder: str | os.PathLike, num_shards: int, settings: dict, *,
                   classes: list[str] | None, **extra) -> dict:
    """Summarise the finished shards ``0 .. num_shards - 1`` of ``folder`` into ``manifest.json``
    (counts, PSNR, the shard files' bytes per image and compression against 8-bit pixels, measured on disk,
    skipped images, the settings); returns it."""
    folder = Path(folder)
    counts, psnrs, skipped = [], [], []
    stored = sum((folder / shard_name(s)).stat().st_size for s in range(num_shards))  # measured file bytes
    for s in range(num_shards):
        g, _, meta = read_shard(folder / shard_name(s))
        counts.append(g.counts())
        psnrs += meta["psnr"]
        skipped += meta["skipped"]
        h, w = int(meta["height"]), int(meta["width"])
    counts = torch.cat(counts).double()
    manifest = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "shards": [shard_name(s) for s in range(num_shards)],
                "num_images": int(len(counts)), "height": h, "width": w, "classes": classes,
                "mean_count": float(counts.mean()), "mean_psnr": sum(psnrs) / len(psnrs),
                "bytes_per_image": stored / max(len(counts), 1),
                "compression_vs_8bit": 3.0 * h * w * len(counts) / max(stored, 1),
                "skipped": skipped, "settings": settings, **extra}
    write_json(folder / "manifest.json", manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a finished folder (ValueError naming the folder when it is missing)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no manifest.json (the conversion has not finished; rerun it to resume)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a gvit shard manifest (format={manifest.get('format')!r})")
    return manifest


def load_shards(folder: str | os.PathLike) -> tuple[Gaussians, Tensor, Tensor, dict]:
    """Read a finished folder: ``(gaussians, labels, indices, manifest)`` in shard order,
    Gaussians padded to the largest count with a ``valid`` mask (None if no shard has one)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    sets, labels, indices = [], [], []
    for name in manifest["shards"]:
        g, lab, meta = read_shard(folder / name)
        sets.append(g)
        labels.append(lab)
        indices.append(torch.tensor(meta["indices"], dtype=torch.long))
    kmax = max(g.num_gaussians for g in sets)
    g = concat([pad(s, kmax) for s in sets])
    if all(s.valid is None and s.num_gaussians == kmax for s in sets):
        g.valid = None
    return g, torch.cat(labels), torch.cat(indices), manifest


class ShardDataset(torch.utils.data.Dataset):
    """A finished shard folder as a dataset of ``((raw [k, 9], valid [k]), label)`` (raw: the
    Gaussians encoded with ``scale_factor``), with ``classes``, ``targets``, ``indices`` (the dataset
    indices of its images), ``manifest`` and ``split`` (the split of the images it was fitted from, as
    ``gvit fit-dataset`` recorded it; None when not recorded)."""

    def __init__(self, folder: str | os.PathLike, scale_factor: float = 1.0):
        g, labels, indices, manifest = load_shards(folder)
        self.raw = encode(g, scale_factor=scale_factor)
        self.valid = valid_mask(g)
        self.targets, self.indices, self.manifest = labels, indices.tolist(), manifest
        self.classes = manifest.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
        self.split = (manifest.get("settings") or {}).get("split")

    def select(self, indices: list[int]) -> "ShardDataset":
        """The items at ``indices`` (positions in this dataset)."""
        out = copy.copy(self)
        index = torch.as_tensor(indices, dtype=torch.long)
        out.raw, out.valid, out.targets = self.raw[index], self.valid[index], self.targets[index]
        out.indices = [self.indices[i] for i in indices]
        return out

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return (self.raw[i], self.valid[i]), int(self.targets[i])

    @staticmethod
    def collate(items):
        raw = torch.stack([r for (r, _), _ in items])
        valid = torch.stack([v for (_, v), _ in items])
        return (raw, valid), torch.tensor([label for _, label in items], dtype=torch.long)
