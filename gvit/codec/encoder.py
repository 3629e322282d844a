"""Images -> ``.gvc`` bytes in one stage, and back.

:func:`encode_image` fits Gaussians to an image with :func:`gvit.fit.fit_gaussians` and the codec's
projection (:func:`gvit.codec.quantize.project`) over the second half of the steps, so the fit ends on
the quantised values in the canonical order the file keeps: what is stored is what was optimised, and
the PSNR reported is the decoded image's. The rate is set by the Gaussian budget ``num_gaussians`` or by
a target ``bpp``: the budget is predicted from the bits a Gaussian costs (:func:`predict_count`), and a
file over the target drops its weakest Gaussians (least luminance contribution) until it fits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from torch import Tensor

from ..fit import FitConfig, fit_gaussians, luminance_contribution
from ..fit.init import check_images
from ..gaussians import Gaussians
from ..losses import psnr, ssim
from ..render import render
from .container import CodecError, Header, pack, unpack
from .entropy import StreamError, decode_symbols, encode_symbols
from .quantize import BitDepths, Symbols, canonical_order, dequantize, project, quantize

__all__ = ["CodedImage", "encode_image", "encode", "encode_gaussians", "decode", "decode_image", "read_header",
           "predict_count", "BITS_BASE", "PROJECT_FROM"]

PROJECT_FROM = 0.5  # the codec's projection acts over the second half of the fit's steps (chosen on val photos)
# bits a Gaussian costs at the default bit depths: BITS_BASE + log2(pixels / Gaussians) (the position's share
# grows with the spacing); measured on the validation photos (docs/codec.md)
BITS_BASE = 34.0


@dataclass
class CodedImage:
    """What :func:`encode_image` returns: the file's ``data``, the decoded ``gaussians`` ``[1, n]`` (file
    order), their ``rendered`` image ``[3, H, W]`` in [0, 1], its ``psnr`` / ``ssim`` against the input,
    encode ``seconds`` and the ``bits`` it was coded with."""

    data: bytes
    gaussians: Gaussians
    rendered: Tensor
    psnr: float
    ssim: float
    seconds: float
    bits: BitDepths

    @property
    def count(self) -> int:
        return self.gaussians.num_gaussians

    @property
    def bpp(self) -> float:
        return 8 * len(self.data) / (self.rendered.shape[-1] * self.rendered.shape[-2])


def predict_count(bpp: float, height: int, width: int, bits_base: float = BITS_BASE) -> int:
    """The Gaussian budget whose file should come to ``bpp`` bits per pixel: k with
    ``k (bits_base + log2(H W / k)) = bpp H W`` (a few fixed-point steps)."""
    pixels = height * width
    total = bpp * pixels
    k = total / bits_base
    for _ in range(20):
        k = total / (bits_base + math.log2(max(pixels / max(k, 1.0), 1.0)))
    return max(1, int(k))


def _symbols_in_order(g: Gaussians, height: int, width: int, bits: BitDepths) -> Symbols:
    sym = quantize(g, height, width, bits)[0]
    return sym.take(canonical_order(sym))


def _pack(sym: Symbols, height: int, width: int, bits: BitDepths, mode: str) -> bytes:
    return pack(Header(height, width, len(sym), bits, mode), encode_symbols(sym, height, width, bits))


def encode_gaussians(g: Gaussians, height: int, width: int, *, bits: BitDepths | None = None,
                     mode: str = "alpha") -> bytes:
    """The ``.gvc`` bytes of one set of decoded Gaussians ``[1, k]`` (quantised as they are, no fitting;
    in ``mode="alpha"`` the file's compositing order is the canonical one, which is not ``g``'s)."""
    bits = bits or BitDepths()
    if g.batch_size != 1 or g.channels != 3:
        raise ValueError(f"encode_gaussians: expected one set of 3-channel Gaussians, got {g.batch_size} sets of "
                         f"{g.channels} channels")
    Header(height, width, 0, bits, mode).check()
    return _pack(_symbols_in_order(g, height, width, bits), height, width, bits, mode)


def encode_image(image: Tensor, *, num_gaussians: int | None = None, bpp: float | None = None,
                 bits: BitDepths | None = None, fit: FitConfig | None = None, progress: bool = False) -> CodedImage:
    """Code one image ``[3, H, W]`` (float in [0, 1]) at ``num_gaussians`` Gaussians or at most ``bpp`` bits
    per pixel (exactly one of them). ``fit`` sets the fitting (its ``num_gaussians`` is replaced; its
    ``mode`` is the file's render mode)."""
    start = time.perf_counter()
    if (num_gaussians is None) == (bpp is None):
        raise ValueError("encode_image: give exactly one of num_gaussians and bpp")
    if bpp is not None and not (math.isfinite(bpp) and bpp > 0):
        raise ValueError(f"bpp must be a finite number > 0, got {bpp!r}")
    if image.ndim != 3:
        raise ValueError(f"encode_image: expected an image [3, H, W], got shape {tuple(image.shape)}")
    check_images(image[None])
    bits = bits or BitDepths()
    h, w = image.shape[-2:]
    fit = fit or FitConfig()
    Header(h, w, 0, bits, fit.mode).check()
    k = num_gaussians if num_gaussians is not None else predict_count(bpp, h, w)
    x = image[None].float()

    def projection(g: Gaussians):
        return project(g, h, w, bits)

    res = fit_gaussians(x, replace(fit, num_gaussians=k), project=projection, project_from=PROJECT_FROM,
                        progress=progress)
    sym = _symbols_in_order(res.gaussians.to("cpu"), h, w, bits)
    data = _pack(sym, h, w, bits, fit.mode)
    if bpp is not None:
        sym, data = _fit_rate(sym, data, bpp, h, w, bits, fit)
    g = dequantize(sym, h, w, bits)
    out = render(g, height=h, width=w, mode=fit.mode).clamp(0, 1)
    target = x.cpu()
    return CodedImage(data, g, out[0], float(psnr(out, target)[0]), float(ssim(out, target)[0]),
                      time.perf_counter() - start, bits)


def _fit_rate(sym: Symbols, data: bytes, bpp: float, h: int, w: int, bits: BitDepths, fit: FitConfig):
    """Drop the weakest Gaussians until the file is at most ``bpp`` (each try aims at the bytes left)."""
    budget = bpp * h * w / 8
    while len(data) > budget and len(sym) > 1:
        g = dequantize(sym, h, w, bits)
        weakest = luminance_contribution(g, height=h, width=w, mode=fit.mode)[0].argsort(descending=True)
        keep = max(1, min(len(sym) - 1, int(len(sym) * budget / len(data) * 0.995)))
        kept = sym.take(weakest[:keep])
        sym = kept.take(canonical_order(kept))
        data = _pack(sym, h, w, bits, fit.mode)
    return sym, data


def encode(image: Tensor, **kwargs) -> bytes:
    """The ``.gvc`` bytes of one image ``[3, H, W]`` (:func:`encode_image`'s keywords)."""
    return encode_image(image, **kwargs).data


def read_header(data: bytes) -> Header:
    """The header of a ``.gvc`` file's bytes (checked, checksum included)."""
    return unpack(data)[0]


def decode(data: bytes) -> Gaussians:
    """The Gaussians ``[1, n]`` (float32, CPU, file order) of a ``.gvc`` file's bytes: exactly the values the
    encoder fitted. A damaged file raises :class:`~gvit.codec.container.CodecError`."""
    return _decode(data)[1]


def _decode(data: bytes) -> tuple[Header, Gaussians]:
    header, words = unpack(data)
    try:
        sym = decode_symbols(words, header.count, header.height, header.width, header.bits)
    except StreamError as exc:
        raise CodecError(str(exc)) from None
    except BaseException as exc:  # constriction reports a malformed stream as a Rust panic
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CodecError(f"the coded stream does not decode ({type(exc).__name__})") from None
    return header, dequantize(sym, header.height, header.width, header.bits)


def decode_image(data: bytes, *, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """The image ``[3, round(H scale), round(W scale)]`` in [0, 1] a ``.gvc`` file's bytes render to; any
    ``scale`` > 0 (the Gaussians are resolution-free)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    header, g = _decode(data)
    height, width = max(1, round(header.height * scale)), max(1, round(header.width * scale))
    return render(g, height=height, width=width, mode=header.mode, backend=backend).clamp(0, 1)[0]
