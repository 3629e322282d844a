"""Entropy coding of one set's symbols with constriction's ANS coder.

Everything is coded into one ANS stack of 32-bit words, in this decoding order:

1. the size groups: the smallest size ``L``, the number of sizes, and how many Gaussians have each
   (universal integer code: a bit length under a fixed geometric model, then the bits below the leading one);
2. the positions, group by group in canonical order: the gaps between successive Morton codes
   (the first from 0), as a bit length (adaptive model) and the bits below the leading one (uniform);
3. ``A >> 1``, the angle (where ``A > 0``), Y, Co, Cg and the opacity, each under its own adaptive model.

An adaptive model codes a stream in chunks (64, 64, 128, 256, ... symbols); each chunk uses the
counts of the symbols before it plus 1/2 (the Krichevsky-Trofimov estimate), so the model costs no
side information and the decoder rebuilds it exactly. A damaged stream decodes to garbage or fails a
check here, but the container's checksum refuses it first.
"""

from __future__ import annotations

import numpy as np
import torch
import constriction

from .quantize import BitDepths, Symbols, morton, scale_range, unmorton

__all__ = ["encode_symbols", "decode_symbols", "StreamError", "placement_bits"]

_FIRST_CHUNK = 64
_LOW_BITS = 12  # mantissas longer than this are coded in two uniform parts (constriction's limit is 2**24)
_UINT_BITS = 40  # the universal code's largest bit length
Categorical, Uniform = constriction.stream.model.Categorical, constriction.stream.model.Uniform
AnsCoder = constriction.stream.stack.AnsCoder
_UINT_MODEL = Categorical(np.exp2(-np.arange(_UINT_BITS + 1, dtype=np.float64) / 2), perfect=False)
_UNIFORM = Uniform()
_GAP_LENGTHS = 33  # bit lengths 0..32 of gaps between 32-bit Morton codes


class StreamError(ValueError):
    """The coded stream does not decode to a valid set."""


def _chunks(n: int) -> list[tuple[int, int]]:
    bounds, start, size = [], 0, _FIRST_CHUNK
    while start < n:
        bounds.append((start, min(n, start + size)))
        start += size
        size = _FIRST_CHUNK if start < 2 * _FIRST_CHUNK else start
    return bounds


def _models(symbols: np.ndarray, alphabet: int) -> list[tuple[int, int, Categorical]]:
    """Each chunk's bounds and model, from the counts of the symbols before it."""
    out, counts = [], np.full(alphabet, 0.5)
    for start, stop in _chunks(len(symbols)):
        out.append((start, stop, Categorical(counts / counts.sum(), perfect=False)))
        np.add.at(counts, symbols[start:stop], 1)
    return out


class _Writer:
    """Operations in decoding order, encoded in reverse at the end (ANS is a stack)."""

    def __init__(self) -> None:
        self.ops: list = []

    def adaptive(self, symbols: np.ndarray, alphabet: int) -> None:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        if alphabet > 1:
            self.ops += [(symbols[a:b], model, None) for a, b, model in _models(symbols, alphabet)]

    def bits(self, values: np.ndarray, nbits: np.ndarray) -> None:
        """``values`` below ``2**nbits`` each (nbits >= 0), uniform."""
        values, nbits = np.asarray(values, dtype=np.int64), np.asarray(nbits, dtype=np.int64)
        low = np.minimum(nbits, _LOW_BITS)
        for part, n in ((values & ((1 << low) - 1), low), (values >> low, nbits - low)):
            use = n > 0
            if use.any():
                self.ops.append((part[use].astype(np.int32), _UNIFORM, (1 << n[use]).astype(np.int32)))

    def uints(self, values) -> None:
        values = np.asarray(values, dtype=np.int64)
        lengths = _bit_length(values)
        self.ops.append((lengths.astype(np.int32), _UINT_MODEL, None))
        self.bits(values - np.where(lengths > 0, 1 << np.maximum(lengths - 1, 0), 0), np.maximum(lengths - 1, 0))

    def words(self) -> np.ndarray:
        coder = AnsCoder()
        for symbols, model, params in reversed(self.ops):
            if params is None:
                coder.encode_reverse(symbols, model)
            else:
                coder.encode_reverse(symbols, model, params)
        return coder.get_compressed()


class _Reader:
    def __init__(self, words: np.ndarray) -> None:
        self.coder = AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))

    def adaptive(self, n: int, alphabet: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.int64)
        if alphabet <= 1:
            return out
        counts = np.full(alphabet, 0.5)
        for start, stop in _chunks(n):
            out[start:stop] = self.coder.decode(Categorical(counts / counts.sum(), perfect=False), stop - start)
            np.add.at(counts, out[start:stop], 1)
        return out

    def bits(self, nbits: np.ndarray) -> np.ndarray:
        nbits = np.asarray(nbits, dtype=np.int64)
        low = np.minimum(nbits, _LOW_BITS)
        parts = []
        for n in (low, nbits - low):
            part = np.zeros(len(nbits), dtype=np.int64)
            use = n > 0
            if use.any():
                part[use] = self.coder.decode(_UNIFORM, (1 << n[use]).astype(np.int32))
            parts.append(part)
        return parts[0] | (parts[1] << low)

    def uints(self, n: int) -> np.ndarray:
        lengths = self.coder.decode(_UINT_MODEL, n).astype(np.int64)
        rest = self.bits(np.maximum(lengths - 1, 0))
        return np.where(lengths > 0, (1 << np.maximum(lengths - 1, 0)) + rest, 0)


def _bit_length(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.int64)
    out = np.zeros(v.shape, dtype=np.int64)
    nz = v > 0
    out[nz] = np.floor(np.log2(v[nz].astype(np.float64))).astype(np.int64) + 1
    # float log2 can be off by one near powers of two: correct exactly
    out[nz] += (v[nz] >= (1 << out[nz])).astype(np.int64)
    out[nz] -= (v[nz] < (1 << np.maximum(out[nz] - 1, 0))).astype(np.int64)
    return out


def _ycocg(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    co = r - b
    t = b + (co >> 1)
    cg = g - t
    return np.stack([t + (cg >> 1), co, cg], 1)


def _rgb(ycocg: np.ndarray) -> np.ndarray:
    y, co, cg = ycocg[:, 0], ycocg[:, 1], ycocg[:, 2]
    t = y - (cg >> 1)
    g = cg + t
    b = t - (co >> 1)
    return np.stack([b + co, g, b], 1)


def _alphabets(height: int, width: int, bits: BitDepths) -> dict[str, int]:
    qmin, qmax = scale_range(height, width, bits)
    levels = 1 << bits.color
    return {"aspect": (qmax - qmin) // 2 + 1, "angle": 1 << bits.angle, "y": levels, "c": 2 * levels - 1,
            "opacity": (1 << bits.opacity) - 1, "gap": _GAP_LENGTHS, "size": 2 * (qmax - qmin) + 1}


def _write_placement(w: _Writer, size: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> None:
    """Stream part 1 and 2 (the module docstring): the size groups, then the Morton gaps within each group
    of a set sorted by size, then Morton code (ValueError when it is not)."""
    sizes, counts = np.unique(size, return_counts=True)
    lo = int(sizes[0]) if len(sizes) else 0
    per_size = np.zeros(int(sizes[-1]) - lo + 1 if len(sizes) else 0, dtype=np.int64)
    per_size[sizes - lo] = counts
    w.uints([lo, len(per_size)])
    w.uints(per_size)
    codes = morton(qx, qy)
    gaps = np.diff(codes, prepend=0)
    starts = np.cumsum(counts) - counts  # each size group's first Gaussian
    gaps[starts] = codes[starts]  # each size group starts from 0
    if (gaps < 0).any() or (np.diff(size) < 0).any():
        raise ValueError("encode_symbols: the set is not in canonical order")
    lengths = _bit_length(gaps)
    w.adaptive(lengths, _GAP_LENGTHS)
    w.bits(gaps - np.where(lengths > 0, 1 << np.maximum(lengths - 1, 0), 0), np.maximum(lengths - 1, 0))


def encode_symbols(sym: Symbols, height: int, width: int, bits: BitDepths) -> np.ndarray:
    """The ANS words ``uint32`` of a set in canonical order (:func:`gvit.codec.quantize.canonical_order`)."""
    a = {f: getattr(sym, f).cpu().numpy().astype(np.int64) for f in ("qx", "qy", "size", "aspect", "angle",
                                                                       "color", "opacity")}
    alpha = _alphabets(height, width, bits)
    w = _Writer()
    _write_placement(w, a["size"], a["qx"], a["qy"])
    w.adaptive(a["aspect"] >> 1, alpha["aspect"])
    w.adaptive(a["angle"][a["aspect"] > 0], alpha["angle"])
    c = _ycocg(a["color"])
    levels = 1 << bits.color
    w.adaptive(c[:, 0], alpha["y"])
    w.adaptive(c[:, 1] + levels - 1, alpha["c"])
    w.adaptive(c[:, 2] + levels - 1, alpha["c"])
    w.adaptive(a["opacity"] - 1, alpha["opacity"])
    return w.words()


def decode_symbols(words: np.ndarray, count: int, height: int, width: int, bits: BitDepths) -> Symbols:
    """The set of ``count`` Gaussians coded in ``words`` (:class:`StreamError` when they do not decode to one)."""
    alpha = _alphabets(height, width, bits)
    r = _Reader(words)
    lo, groups = (int(v) for v in r.uints(2))
    if groups > alpha["size"] or lo + groups > alpha["size"] or (count > 0) != (groups > 0):
        raise StreamError(f"size groups out of range ({groups} from {lo})")
    per_size = r.uints(groups)
    if int(per_size.sum()) != count:
        raise StreamError(f"size groups hold {int(per_size.sum())} Gaussians, the header says {count}")
    lengths = r.adaptive(count, alpha["gap"])
    gaps = np.where(lengths > 0, 1 << np.maximum(lengths - 1, 0), 0) + r.bits(np.maximum(lengths - 1, 0))
    group = np.repeat(np.arange(groups), per_size)
    size = group + lo
    running = np.cumsum(gaps)
    first = np.searchsorted(group, np.arange(groups)).clip(max=max(count - 1, 0))  # each group's first Gaussian
    codes = running - (running[first] - gaps[first])[group] if count else running  # each group starts from 0
    qx, qy = unmorton(codes)
    if count and (codes.max() >= 1 << 32 or qx.max() >= width << bits.position or qy.max() >= height << bits.position):
        raise StreamError("a position lies outside the image")
    aspect = (r.adaptive(count, alpha["aspect"]) << 1) | (size & 1)
    if count and ((aspect > size) | (size + aspect > alpha["size"] - 1)).any():
        raise StreamError("a scale lies outside the range")
    angle = np.zeros(count, dtype=np.int64)
    angle[aspect > 0] = r.adaptive(int((aspect > 0).sum()), alpha["angle"])
    levels = 1 << bits.color
    c = np.stack([r.adaptive(count, alpha["y"]), r.adaptive(count, alpha["c"]) - (levels - 1),
                  r.adaptive(count, alpha["c"]) - (levels - 1)], 1)
    rgb = _rgb(c) if count else np.zeros((0, 3), dtype=np.int64)
    if count and ((rgb < 0) | (rgb >= levels)).any():
        raise StreamError("a colour lies outside the range")
    opacity = r.adaptive(count, alpha["opacity"]) + 1
    if not r.coder.is_empty():
        raise StreamError("data left over after the last Gaussian")
    t = torch.from_numpy
    return Symbols(t(qx), t(qy), t(size), t(aspect), t(angle), t(rgb.astype(np.int64)), t(opacity))


def placement_bits(sym: Symbols, height: int, width: int, bits: BitDepths) -> dict[str, float]:
    """Bits per Gaussian that positions and sizes take, coded as the file codes them (size groups, then
    sorted Morton gaps: ``canonical``) and coded as a list that keeps the set's order (``listed``: the size
    under an adaptive model, each coordinate's top 6 bits under an adaptive model and the rest uniform), with
    ``log2(n!) / n``, the bits an order costs, for reference."""
    a = {f: getattr(sym, f).cpu().numpy().astype(np.int64) for f in ("qx", "qy", "size")}
    n = max(len(sym), 1)
    order = np.lexsort([morton(a["qx"], a["qy"]), a["size"]])
    w = _Writer()
    _write_placement(w, a["size"][order], a["qx"][order], a["qy"][order])
    canonical = 32 * len(w.words()) / n
    w = _Writer()
    w.adaptive(a["size"], _alphabets(height, width, bits)["size"])
    for q, cells in ((a["qx"], width << bits.position), (a["qy"], height << bits.position)):
        low = max(int(np.ceil(np.log2(cells))) - 6, 0)
        w.adaptive(q >> low, 64)
        w.bits(q & ((1 << low) - 1), np.full(len(q), low))
    listed = 32 * len(w.words()) / n
    order = float(np.sum(np.log2(np.arange(1, n + 1)))) / n
    return {"canonical": canonical, "listed": listed, "saved": listed - canonical, "log2_factorial": order}
