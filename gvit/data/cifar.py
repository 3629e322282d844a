"""CIFAR-10 / CIFAR-100 "python version" batches, read without running pickled code.

The batches are pickles of dicts holding numpy arrays and lists. :func:`load_pickle` uses an
unpickler that only rebuilds numpy arrays and dtypes and plain containers; any other global
(the way a malicious pickle runs code) is refused with an error naming the file.

Layouts accepted by :class:`CifarBatches` (``root``): the extracted folder
(``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``;
``cifar-100-python/`` with ``train``, ``test``, ``meta``), its parent, or the ``.tar.gz``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .base import InMemoryImages

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}

CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"}
CIFAR100_FILES = {"train": ["train"], "test": ["test"], "meta": "meta"}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name} (only numpy arrays, "
                                     "lists and dicts are allowed in a dataset batch)")


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def load_pickle(data: bytes, source: str) -> dict:
    """Unpickle a dataset batch allowing numpy arrays, lists and dicts only; keys become str."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise ValueError(f"{source}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


class _Source:
    """Files of one CIFAR layout, from a directory or a .tar.gz."""

    def __init__(self, root: Path):
        self.root = root
        self.tar = tarfile.open(root) if root.is_file() else None
        names = ([m.name for m in self.tar.getmembers() if m.isfile()] if self.tar is not None
                 else [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()])
        self.names = {Path(n).name: n for n in names}

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> tuple[bytes, str]:
        where = f"{self.root}:{self.names[name]}" if self.tar is not None else str(self.root / self.names[name])
        if self.tar is not None:
            return self.tar.extractfile(self.names[name]).read(), where
        return (self.root / self.names[name]).read_bytes(), where


def is_cifar(root: str | os.PathLike) -> bool:
    """True when ``root`` looks like a CIFAR-10 or CIFAR-100 python layout (folder or .tar.gz)."""
    root = Path(root)
    if root.is_file():
        return root.name.endswith((".tar.gz", ".tgz")) and "cifar" in root.name.lower()
    if not root.is_dir():
        return False
    files = {p.name for p in root.iterdir()} | {p.name for d in root.iterdir() if d.is_dir() for p in d.iterdir()}
    return {"test_batch", "batches.meta"} <= files or {"train", "test", "meta"} <= files


class CifarBatches(InMemoryImages):
    """CIFAR-10 or CIFAR-100 (python batches) as ``(image [3, 32, 32] float in [0, 1], label)``.

    ``split`` is "train" or "test". For CIFAR-100, ``label`` picks "fine" (100 classes) or
    "coarse" (20). All images are held in memory as uint8 (150 MB for the 50,000 training images).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, label: str = "fine"):
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
        if label not in ("fine", "coarse"):
            raise ValueError(f"CIFAR-100 label must be 'fine' or 'coarse', got {label!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"CIFAR: {self.root} does not exist")
        with _Source(self.root) as src:
            self._load(src, split, label)

    def _load(self, src: _Source, split: str, label: str) -> None:
        if src.has("batches.meta"):
            layout, label_key, names_key = CIFAR10_FILES, "labels", "label_names"
        elif src.has("meta") and src.has("train"):
            layout, label_key, names_key = CIFAR100_FILES, f"{label}_labels", f"{label}_label_names"
        else:
            raise ValueError(f"CIFAR: {self.root} holds neither CIFAR-10 (batches.meta, data_batch_*) nor "
                             "CIFAR-100 (meta, train, test) python batches")
        data, labels = [], []
        for name in layout[split]:
            if not src.has(name):
                raise FileNotFoundError(f"CIFAR: {self.root} lacks the batch file {name!r}")
            batch = load_pickle(*src.read(name))
            where = f"{self.root}:{name}"
            x = batch.get("data")
            y = batch.get(label_key)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{where}: 'data' must be a uint8 array [N, 3072], got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            y = np.asarray(y if y is not None else [], dtype=np.int64)
            if y.shape != (x.shape[0],):
                raise ValueError(f"{where}: {label_key!r} must hold one label per image ({x.shape[0]}), got {y.shape}")
            data.append(x)
            labels.append(y)
        meta = load_pickle(*src.read(layout["meta"]))
        self.classes = [_text(c) for c in meta.get(names_key, [])]
        self.images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32)
        self.targets = torch.from_numpy(np.concatenate(labels))
        n_classes = len(self.classes) or int(self.targets.max()) + 1
        if self.targets.min() < 0 or self.targets.max() >= n_classes:
            raise ValueError(f"CIFAR: {self.root} has labels outside [0, {n_classes})")
