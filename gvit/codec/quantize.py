"""The codec's quantiser: decoded Gaussians <-> integer symbols, the canonical order, and the
straight-through projection the fit optimises.

Every attribute has a fixed grid set by its bit depth (:class:`BitDepths`) and the image size, so
nothing but the bit depths and the size needs to be stored:

* position: a grid of ``2**position`` cells per pixel along each axis; ``qx`` in
  ``[0, W 2**position)``, the cell's centre is the value.
* scales: ``log2`` of the standard deviation in pixels of the long side (``s * max(H, W) / 2``), in
  steps of ``2**-scale`` octaves from 1/8 pixel up to the whole image. Stored as the size ``L = qa + qb``
  (from the smallest) and the aspect ``A = qa - qb >= 0`` (the long axis is the first: a Gaussian
  with ``sx < sy`` is the same as ``(sy, sx, angle + pi/2)``); ``A`` has the parity of ``L``, so
  ``A >> 1`` is what is coded.
* angle: ``[0, pi)`` in ``2**angle`` steps; none for a round Gaussian (``A = 0``, angle 0).
* colour: ``2**color`` levels per channel in [0, 1], coded as YCoCg-R (an integer transform that
  is exactly invertible).
* opacity: ``2**opacity`` levels in [0, 1]; a Gaussian quantised to opacity 0 draws nothing and is
  dropped.

The canonical order is the compositing order the file keeps without coding it: by size ``L``,
smallest first (in front), then by the Morton (Z-order) code of the position, then by the other
symbols. A set in this order is rebuilt by the decoder from the sorted positions alone, so no bits
are spent on order. Dequantisation is plain float64 arithmetic on the symbols (powers of two from a
table of constants) cast to float32: the same values on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ..gaussians import Gaussians

__all__ = ["BitDepths", "Symbols", "SCALE_FLOOR", "scale_range", "quantize", "dequantize", "canonical_order",
           "morton", "unmorton", "project"]

SCALE_FLOOR = -3  # the smallest scale: 2**-3 = 1/8 pixel
_MAX_BITS = {"position": 4, "scale": 4, "angle": 10, "color": 10, "opacity": 10}
_MIN_BITS = {"position": 0, "scale": 0, "angle": 1, "color": 1, "opacity": 1}


@dataclass(frozen=True)
class BitDepths:
    """Bit depths of the quantiser (see the module docstring for what each means)."""

    position: int = 2
    scale: int = 2
    angle: int = 6
    color: int = 5
    opacity: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or not \
                    _MIN_BITS[f.name] <= value <= _MAX_BITS[f.name]:
                raise ValueError(f"bit depth {f.name} must be an int in [{_MIN_BITS[f.name]}, {_MAX_BITS[f.name]}], "
                                 f"got {value!r}")

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class Symbols:
    """One set's quantised Gaussians, ``[n]`` int64 each: ``qx``, ``qy`` (position cells), ``size``
    (``L``), ``aspect`` (``A``), ``angle``, ``color`` ``[n, 3]`` (RGB levels), ``opacity`` (>= 1)."""

    qx: Tensor
    qy: Tensor
    size: Tensor
    aspect: Tensor
    angle: Tensor
    color: Tensor
    opacity: Tensor

    def __len__(self) -> int:
        return len(self.qx)

    def take(self, index: Tensor) -> "Symbols":
        return Symbols(*(getattr(self, f.name)[index] for f in fields(self)))


def scale_range(height: int, width: int, bits: BitDepths) -> tuple[int, int]:
    """``(qmin, qmax)``: the log2-scale levels of one axis, from 1/8 pixel to ``max(H, W) / 2`` pixels."""
    steps = 1 << bits.scale
    top = int(np.ceil(np.log2(max(height, width) / 2) * steps))
    return SCALE_FLOOR * steps, max(top, SCALE_FLOOR * steps + 1)


def _half_side(height: int, width: int) -> float:
    return max(height, width) / 2.0


def _canonical(g: Gaussians) -> tuple[Tensor, Tensor]:
    """Scales with the long axis first and the angle in [0, pi) (the same covariance); differentiable."""
    swap = g.scales[..., 0] < g.scales[..., 1]
    long = torch.where(swap, g.scales[..., 1], g.scales[..., 0])
    short = torch.where(swap, g.scales[..., 0], g.scales[..., 1])
    angle = g.angles + swap.to(g.angles.dtype) * (np.pi / 2)
    angle = angle - np.pi * torch.floor(angle / np.pi)
    return torch.stack([long, short], -1), angle


def quantize(g: Gaussians, height: int, width: int, bits: BitDepths) -> list[Symbols]:
    """The symbols of every set of ``g`` (invalid slots and Gaussians quantised to opacity 0 left out),
    in the sets' own order."""
    return [sym for sym, _ in _quantize_sets(g, height, width, bits)]


def _quantize_sets(g: Gaussians, height: int, width: int, bits: BitDepths) -> list[tuple[Symbols, Tensor]]:
    """Per set: its symbols and the slots they come from."""
    scales, angle = _canonical(g)
    steps = 1 << bits.scale
    qmin, qmax = scale_range(height, width, bits)
    cells_x, cells_y = width << bits.position, height << bits.position
    m = g.means.detach().double()
    qx = torch.floor((m[..., 0] + 1) / 2 * cells_x).long().clamp(0, cells_x - 1)
    qy = torch.floor((m[..., 1] + 1) / 2 * cells_y).long().clamp(0, cells_y - 1)
    pixels = scales.detach().double().clamp_min(1e-30) * _half_side(height, width)
    qs = torch.round(torch.log2(pixels) * steps).long().clamp(qmin, qmax) - qmin
    size, aspect = qs[..., 0] + qs[..., 1], qs[..., 0] - qs[..., 1]
    turns = 1 << bits.angle
    qa = torch.round(angle.detach().double() / np.pi * turns).long() % turns
    qa = torch.where(aspect == 0, torch.zeros_like(qa), qa)
    top = (1 << bits.color) - 1
    qc = torch.round(g.colors.detach().double().clamp(0, 1) * top).long()
    otop = (1 << bits.opacity) - 1
    qo = torch.round(g.opacities.detach().double().clamp(0, 1) * otop).long()
    keep = qo > 0
    if g.valid is not None:
        keep &= g.valid
    out = []
    for b in range(g.batch_size):
        i = keep[b].nonzero().flatten()
        out.append((Symbols(qx[b, i], qy[b, i], size[b, i], aspect[b, i], qa[b, i], qc[b, i], qo[b, i]), i))
    return out


def dequantize(sym: Symbols, height: int, width: int, bits: BitDepths) -> Gaussians:
    """The Gaussians ``[1, n]`` (float32, CPU) that ``sym`` stands for, in its order."""
    s = Symbols(*(getattr(sym, f.name).cpu() for f in fields(sym)))
    cells_x, cells_y = width << bits.position, height << bits.position
    x = (s.qx.double() + 0.5) * (2.0 / cells_x) - 1.0
    y = (s.qy.double() + 0.5) * (2.0 / cells_y) - 1.0
    steps = 1 << bits.scale
    qmin, _ = scale_range(height, width, bits)
    qa, qb = (s.size + s.aspect) // 2 + qmin, (s.size - s.aspect) // 2 + qmin
    fraction = torch.tensor([2.0 ** (j / steps) for j in range(steps)], dtype=torch.float64)  # 2**(j/steps)

    def power(q: Tensor) -> Tensor:  # 2**(q / steps) exactly as 2**floor * table[rest]
        whole = torch.div(q, steps, rounding_mode="floor")
        return torch.ldexp(fraction[q - whole * steps], whole.double())

    half = _half_side(height, width)
    scales = torch.stack([power(qa), power(qb)], -1) / half
    angles = s.angle.double() * (np.pi / (1 << bits.angle))
    colors = s.color.double() / ((1 << bits.color) - 1)
    opacities = s.opacity.double() / ((1 << bits.opacity) - 1)
    return Gaussians(*(t.float()[None] for t in (torch.stack([x, y], -1), scales, angles, colors, opacities)))


def _part1by1(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64) & 0xFFFF
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    return (v | (v << 1)) & 0x55555555


def _compact1by1(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64) & 0x55555555
    v = (v | (v >> 1)) & 0x33333333
    v = (v | (v >> 2)) & 0x0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF
    return ((v | (v >> 8)) & 0xFFFF).astype(np.int64)


def morton(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Z-order codes of 16-bit cell coordinates (x in the even bits), int64."""
    return (_part1by1(qx) | (_part1by1(qy) << np.uint64(1))).astype(np.int64)


def unmorton(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`morton`: ``(qx, qy)``."""
    code = code.astype(np.uint64)
    return _compact1by1(code), _compact1by1(code >> np.uint64(1))


def canonical_order(sym: Symbols) -> Tensor:
    """The permutation that puts ``sym`` in canonical order (size, then Morton code, then the rest)."""
    cols = [sym.opacity, sym.color[:, 2], sym.color[:, 1], sym.color[:, 0], sym.angle, sym.aspect]
    keys = [c.cpu().numpy() for c in cols] + [morton(sym.qx.cpu().numpy(), sym.qy.cpu().numpy()),
                                              sym.size.cpu().numpy()]
    return torch.from_numpy(np.lexsort(keys)).to(sym.qx.device) if len(sym) else torch.zeros(0, dtype=torch.long)


def project(g: Gaussians, height: int, width: int, bits: BitDepths) -> tuple[Gaussians, Tensor]:
    """The straight-through projection of a fit (:data:`gvit.fit.core.Projection`): the dequantised
    values of ``g`` ``[B, k]`` in their value, ``g``'s gradient, and each set's canonical order
    ``[B, k]`` (the kept Gaussians first; the rest, ``valid`` False, after them)."""
    scales, angle = _canonical(g)
    k = g.num_gaussians
    kept = torch.zeros(g.means.shape[:2], dtype=torch.bool, device=g.means.device)
    order = torch.empty(g.means.shape[:2], dtype=torch.long, device=g.means.device)
    originals = (g.means, scales, angle, g.colors, g.opacities)
    values = [t.detach().clone() for t in originals]  # slots not kept keep their values (and valid False)
    for b, (sym, slots) in enumerate(_quantize_sets(g, height, width, bits)):
        first = slots[canonical_order(sym)]
        rest = torch.ones(k, dtype=torch.bool, device=slots.device)
        rest[first] = False
        order[b] = torch.cat([first, rest.nonzero().flatten()])
        kept[b, first] = True
        d = dequantize(sym, height, width, bits)
        for v, t in zip(values, (d.means, d.scales, d.angles, d.colors, d.opacities)):
            v[b, slots] = t[0].to(v)
    means, scales, angles, colors, opacities = (o + (v - o).detach() for o, v in zip(originals, values))
    return Gaussians(means, scales, angles, colors, opacities, kept), order

