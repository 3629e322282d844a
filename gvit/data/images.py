"""Image files and ImageFolder trees (a directory or a .zip), read into float RGB tensors.

Every image comes out as ``[3, H, W]`` float32 in [0, 1], whatever its file mode: RGB,
grayscale (replicated to 3 channels), RGBA / LA / palette with transparency (composited onto
white), 16-bit and 32-bit integer (scaled by their full range), float, CMYK and YCbCr; turned
upright as its EXIF orientation says (as cameras and phones write it, and as viewers show it), so
``H x W`` is the size the photo is displayed at. A file that cannot be decoded raises
:class:`ImageReadError` naming it.

ImageFolder layout: ``<root>/<class>/<file>`` with classes sorted by name (labels 0..n-1), as
a directory or inside a zip archive (directory entries in the archive are ignored).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """A file that is not a readable image (the message names it)."""


def _to_rgb_array(img, name: str) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        top = 65535.0 if raw.max(initial=0) <= 65535 else float(2**31 - 1)
        arr = np.clip(raw.astype(np.float32) / top, 0.0, 1.0)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{name}: float image contains NaN or inf")
        arr = np.clip(arr, 0.0, 1.0) if arr.max(initial=0) <= 1.0 else np.clip(arr / 255.0, 0.0, 1.0)
    else:
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        elif mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if mode in ("PA", "La") else "RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if img.mode in ("RGBA", "LA"):
            color, alpha = arr[..., :-1], arr[..., -1:]
            arr = color * alpha + (1.0 - alpha)  # composite onto white
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def decode_image(data: bytes | str | os.PathLike, name: str | None = None, *, min_size: int = 1) -> Tensor:
    """Decode an image (a path or the file's bytes) to ``[3, H, W]`` float32 in [0, 1].

    Raises :class:`ImageReadError` naming ``name`` (or the path) for anything that is not a
    decodable image, or one smaller than ``min_size`` pixels on a side.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if name is None:
        name = str(data) if not isinstance(data, bytes) else "<bytes>"
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
    except OSError as exc:
        raise ImageReadError(f"{name}: cannot open ({exc.strerror or exc})") from exc
    try:
        with source, Image.open(source) as img:
            img.load()
            arr = _to_rgb_array(ImageOps.exif_transpose(img), name)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({exc})") from exc
    if min(arr.shape[:2]) < min_size:
        raise ImageReadError(f"{name}: image is {arr.shape[1]}x{arr.shape[0]}, smaller than min_size={min_size}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file as displayed (after its EXIF orientation), from its
    header, without decoding the pixels.

    Raises :class:`ImageReadError` naming the file when it is not a recognisable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc
    return height, width


def read_image(path: str | os.PathLike, *, min_size: int = 1) -> Tensor:
    """Read one image file to ``[3, H, W]`` float32 in [0, 1] (see :func:`decode_image`)."""
    return decode_image(Path(path), str(path), min_size=min_size)


def read_or_skip(path: str | os.PathLike, skip_bad: bool, skipped: list[str]) -> Tensor | None:
    """:func:`read_image`, or for an unreadable file with ``skip_bad`` None, its error appended to
    ``skipped`` (without ``skip_bad`` the :class:`ImageReadError` is raised)."""
    try:
        return read_image(path)
    except ImageReadError as exc:
        if not skip_bad:
            raise
        skipped.append(str(exc))
        return None


class ImageFolder(torch.utils.data.Dataset):
    """``<root>/<class>/<image>`` as a dataset of ``(image [3, H, W], label)``; root is a
    directory or a .zip archive. Safe to use with DataLoader workers (each opens its own zip
    handle)."""

    def __init__(self, root: str | os.PathLike, *, min_size: int = 1):
        self.root = Path(root)
        self.min_size = min_size
        if not self.root.exists():
            raise FileNotFoundError(f"ImageFolder: {self.root} does not exist")
        self.is_zip = self.root.is_file()
        if self.is_zip:
            if not zipfile.is_zipfile(self.root):
                raise ValueError(f"ImageFolder: {self.root} is neither a directory nor a zip archive")
            with zipfile.ZipFile(self.root) as zf:  # "<class>/<image>" names; directory entries end in "/"
                pairs = [(n.split("/")[0], n) for n in zf.namelist()
                         if n.count("/") == 1 and n.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            pairs = [(d.name, str(f.relative_to(self.root)))
                     for d in self.root.iterdir() if d.is_dir()
                     for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        self.classes = sorted({c for c, _ in pairs})
        if not pairs:
            raise ValueError(f"ImageFolder: no images in {self.root} (expected <class>/<image> with one of "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = sorted((name, index[c]) for c, name in pairs)
        self._zip = None
        self._zip_pid = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def _read_bytes(self, name: str) -> bytes:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        return self._zip.read(name)

    def __getitem__(self, i: int):
        name, label = self.samples[i]
        where = f"{self.root}:{name}"
        if self.is_zip:
            image = decode_image(self._read_bytes(name), where, min_size=self.min_size)
        else:
            image = decode_image(self.root / name, where, min_size=self.min_size)
        return image, label

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state
