"""Datasets and image readers. :mod:`gvit.data.shapes` is the built-in procedural dataset (no
download); :mod:`gvit.data.images` reads image files and ImageFolder trees (directory or .zip);
:mod:`gvit.data.cifar` reads CIFAR python batches without running pickled code;
:func:`open_dataset` opens any of them by path; :mod:`gvit.data.captions` gives images with text
(captioned shapes, class prompts, caption files) and :mod:`gvit.data.text` an offline BPE tokenizer."""

from .base import Subset, dataset_labels, dataset_masks, spread_indices
from .captions import AttributeCaptions, CaptionedShapes, CaptionFile, ClassCaptions
from .cifar import CifarBatches, load_pickle
from .datasets import ShapesDataset, open_dataset
from .images import IMAGE_EXTENSIONS, ImageFolder, ImageReadError, decode_image, image_size, read_image, read_or_skip
from .shapes import SHAPE_CLASSES, make_shapes
from .text import TextTokenizer

__all__ = ["SHAPE_CLASSES", "make_shapes", "ShapesDataset", "ImageFolder", "ImageReadError", "IMAGE_EXTENSIONS",
           "decode_image", "image_size", "read_image", "read_or_skip", "CifarBatches", "load_pickle", "open_dataset",
           "spread_indices", "dataset_labels", "dataset_masks",
           "Subset", "CaptionedShapes", "ClassCaptions", "AttributeCaptions", "CaptionFile", "TextTokenizer"]
