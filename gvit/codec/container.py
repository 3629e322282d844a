"""The ``.gvc`` file: a fixed header, the ANS payload and a CRC-32 (docs/codec.md has the layout).

All integers little-endian::

    offset  size  field
    0       4     magic b"GVC\\x00"
    4       1     version (1)
    5       1     render mode (0: alpha, 1: sum)
    6       2     height (pixels, 1..65535)
    8       2     width
    10      1     channels (3)
    11      5     bit depths: position, scale, angle, color, opacity
    16      4     Gaussians
    20      4n    payload: n uint32 words of the ANS stack (gvit.codec.entropy)
    20+4n   4     CRC-32 (zlib) of every byte before it

A file that is short, has another magic, a newer version, a bad checksum or values out of range is
refused with :class:`CodecError`, a one-line ValueError, before anything is decoded.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .quantize import BitDepths

__all__ = ["MAGIC", "VERSION", "EXTENSION", "MODES", "MAX_GAUSSIANS", "CodecError", "Header", "pack", "unpack"]

MAGIC = b"GVC\x00"
VERSION = 1
EXTENSION = ".gvc"
MODES = ("alpha", "sum")
MAX_GAUSSIANS = 1 << 24
_HEAD = struct.Struct("<4sBBHHB5BI")


class CodecError(ValueError):
    """A coded image that cannot be read: the message says why, in one line."""


@dataclass(frozen=True)
class Header:
    """What a ``.gvc`` file says about its image: size, channels, render mode, bit depths, Gaussians."""

    height: int
    width: int
    count: int
    bits: BitDepths
    mode: str = "alpha"
    channels: int = 3

    def check(self) -> None:
        """Raise :class:`CodecError` when these values cannot describe a coded image."""
        if not (1 <= self.height <= 65535 and 1 <= self.width <= 65535):
            raise CodecError(f"image size {self.height}x{self.width} out of range (1..65535)")
        if (max(self.height, self.width) << self.bits.position) > 1 << 16:
            raise CodecError(f"{self.bits.position} position bits do not fit a {self.height}x{self.width} image "
                             "(at most 65536 cells per side)")
        if self.mode not in MODES:
            raise CodecError(f"render mode {self.mode!r} unknown")
        if self.channels != 3:
            raise CodecError(f"{self.channels} channels (only 3 are supported)")
        if not 0 <= self.count <= MAX_GAUSSIANS:
            raise CodecError(f"{self.count} Gaussians out of range (at most {MAX_GAUSSIANS})")


def pack(header: Header, words: np.ndarray) -> bytes:
    """The file's bytes: header, payload words, checksum."""
    header.check()
    head = _HEAD.pack(MAGIC, VERSION, MODES.index(header.mode), header.height, header.width, header.channels,
                      *header.bits.as_tuple(), header.count)
    body = head + np.ascontiguousarray(words, dtype="<u4").tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, np.ndarray]:
    """``(header, payload words)`` of a file's bytes, checked (:class:`CodecError` otherwise)."""
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise CodecError("not a .gvc coded image (wrong magic)")
    if len(data) < _HEAD.size + 4:
        raise CodecError(f"truncated: {len(data)} bytes, a header needs {_HEAD.size + 4}")
    magic, version, mode, height, width, channels, *rest = _HEAD.unpack_from(data)
    if version > VERSION:
        raise CodecError(f"format version {version} is newer than this gvit reads ({VERSION}); update gvit")
    if version < 1:
        raise CodecError(f"format version {version} unknown")
    if (len(data) - _HEAD.size - 4) % 4:
        raise CodecError(f"truncated or padded: {len(data)} bytes is not a whole number of 32-bit words")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise CodecError("checksum mismatch: the file is damaged or truncated")
    if mode >= len(MODES):
        raise CodecError(f"render mode {mode} unknown")
    try:
        bits = BitDepths(*rest[:5])
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    header = Header(height, width, rest[5], bits, MODES[mode], channels)
    header.check()
    return header, np.frombuffer(data, dtype="<u4", count=(len(data) - _HEAD.size - 4) // 4,
                                 offset=_HEAD.size).astype(np.uint32)
