"""Gaussian image coding: ``.gvc`` files that hold an image as quantised, entropy-coded 2D Gaussians.

``encode(image, bpp=0.5) -> bytes`` fits and codes in one stage; ``decode(bytes) -> Gaussians`` gives back
exactly the values the encoder optimised; ``decode_image(bytes, scale=2)`` renders them at any size. The
parts stay apart: :mod:`~gvit.codec.quantize` (values <-> symbols, canonical order),
:mod:`~gvit.codec.entropy` (symbols <-> ANS words, constriction) and :mod:`~gvit.codec.container` (the
file: header, payload, checksum); :mod:`~gvit.codec.encoder` puts them together with the fit.
"""

from .container import EXTENSION, VERSION, CodecError, Header
from .encoder import (PROJECT_FROM, CodedImage, decode, decode_image, encode, encode_gaussians, encode_image,
                      predict_count, read_header)
from .quantize import BitDepths, canonical_order, dequantize, project, quantize

__all__ = ["PROJECT_FROM", "EXTENSION", "VERSION", "CodecError", "Header", "CodedImage", "BitDepths", "encode",
           "encode_image", "encode_gaussians", "decode", "decode_image", "read_header", "predict_count", "quantize",
           "dequantize", "canonical_order", "project"]
