"""Datasets and image readers. :mod:`gvit.data.shapes` is the built-in procedural dataset (no
download); :mod:`gvit.data.images` reads image files and ImageFolder trees (directory or .zip)."""

from .images import ImageFolder, ImageReadError, decode_image, read_image
from .shapes import SHAPE_CLASSES, make_shapes

__all__ = ["SHAPE_CLASSES", "make_shapes", "ImageFolder", "ImageReadError", "decode_image", "read_image"]
