"""Datasets. :mod:`gvit.data.shapes` is the built-in procedural dataset (no download)."""

from .shapes import SHAPE_CLASSES, make_shapes

__all__ = ["SHAPE_CLASSES", "make_shapes"]
