"""The 2D Gaussian representation: raw layout, decoding, covariance algebra and files.

Conventions (used by every module of gvit):

* Coordinates are normalised: x in [-1, 1] from left to right, y in [-1, 1] from top to
  bottom, whatever the image's aspect ratio. Pixel (row i, column j) of an H x W image sits
  at x = (2j + 1) / W - 1, y = (2i + 1) / H - 1.
* A Gaussian has a mean ``(x, y)``, scales ``(sx, sy)`` (standard deviations along its own
  axes, in normalised units), an angle ``phi`` in radians that turns its local x-axis from +x
  toward +y, a colour of C channels and an opacity in [0, 1].
  ``Sigma = R(phi) diag(sx^2, sy^2) R(phi)^T``.
* The *raw* layout is the 9-vector of GViT (paper 2.1) ``[px, py, sx, sy, phi, r, g, b, o]``
  with unbounded values; :func:`decode` maps it to the decoded parameters above (paper 2.2 and
  Algorithm 1): means = tanh, scales = c * sigmoid, angle unchanged, colours and opacity =
  sigmoid.
* Batches are ``[B, k, ...]``: B images (or Gaussian sets), k Gaussians each. Sets of varying
  size carry a boolean ``valid`` mask ``[B, k]``; invalid slots are ignored by consumers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .files import read_safetensors, write_safetensors

RAW_LAYOUT = ("px", "py", "sx", "sy", "phi", "r", "g", "b", "o")
RAW_DIM = len(RAW_LAYOUT)
POS, SCALE, ANGLE, COLOR, OPACITY = slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 8), slice(8, 9)

FILE_FORMAT = "gvit.gaussians"
FILE_VERSION = "1"


@dataclass
class Gaussians:
    """A batch of decoded 2D Gaussian sets.

    Shapes: means ``[B, k, 2]``, scales ``[B, k, 2]`` (> 0), angles ``[B, k]``,
    colors ``[B, k, C]``, opacities ``[B, k]`` (in [0, 1]), valid ``[B, k]`` bool or None
    (None: every slot holds a Gaussian).
    """

    means: Tensor
    scales: Tensor
    angles: Tensor
    colors: Tensor
    opacities: Tensor
    valid: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    @property
    def channels(self) -> int:
        return self.colors.shape[-1]

    def counts(self) -> Tensor:
        """Number of valid Gaussians per set, ``[B]`` int64."""
        if self.valid is None:
            return torch.full((self.batch_size,), self.num_gaussians, dtype=torch.long)
        return self.valid.sum(dim=1)

    def masked_opacities(self) -> Tensor:
        """Opacities with invalid slots set to 0, so renderers can ignore them."""
        if self.valid is None:
            return self.opacities
        return self.opacities * self.valid.to(self.opacities.dtype)

    def to(self, *args, **kwargs) -> "Gaussians":
        """Like ``Tensor.to`` for every field (the valid mask keeps its bool dtype)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
            elif f.name == "valid":
                device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
                out[f.name] = t.to(device) if device is not None else t
            else:
                out[f.name] = t.to(*args, **kwargs)
        return Gaussians(**out)

    def __getitem__(self, index) -> "Gaussians":
        """Select sets along the batch dimension (keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                                for f in fields(self)})



# --------------------------------------------------------------------------- set operations


def take(t: Tensor, order: Tensor) -> Tensor:
    """``t[b, order[b, j], ...]`` for a ``[B, k, ...]`` tensor and indices ``[B, k']``."""
    return torch.gather(t, 1, order.view(*order.shape, *([1] * (t.ndim - 2))).expand(*order.shape, *t.shape[2:]))


def take_sets(g: Gaussians, order: Tensor) -> Gaussians:
    """Reorder / select the Gaussians of every set by ``order`` ``[B, k']`` (all fields, mask included)."""
    return Gaussians(**{f.name: None if getattr(g, f.name) is None else take(getattr(g, f.name), order)
                        for f in fields(Gaussians)})


def compact(gaussians: Gaussians, raw: Tensor | None = None):
    """Move each set's valid Gaussians to the front (order kept) and cut the padding to the
    largest count in the batch. Returns the compacted Gaussians (and raw, when given)."""
    g = gaussians
    if g.valid is None:
        return (g, raw) if raw is not None else g
    order = (~g.valid).to(torch.int8).argsort(dim=1, stable=True)
    kmax = max(1, int(g.valid.sum(1).max()))
    order = order[:, :kmax]
    out = take_sets(g, order)
    return (out, take(raw, order)) if raw is not None else out


def valid_mask(g: Gaussians) -> Tensor:
    """``g.valid``, or an all-True ``[B, k]`` mask where it is None."""
    return g.valid if g.valid is not None else torch.ones(g.means.shape[:2], dtype=torch.bool, device=g.means.device)


def concat(sets: list[Gaussians]) -> Gaussians:
    """Concatenate batches of the same k along B (valid masks kept, or made all-True where one is None)."""
    valid = torch.cat([valid_mask(g) for g in sets]) if any(g.valid is not None for g in sets) else None
    return Gaussians(*(torch.cat([getattr(g, f) for g in sets]) for f in _FIELDS), valid=valid)


def pad(g: Gaussians, k: int) -> Gaussians:
    """Pad every set to ``k`` slots with invalid Gaussians (a valid mask is always returned)."""
    extra = k - g.num_gaussians
    if extra < 0:
        raise ValueError(f"pad: the sets already have {g.num_gaussians} > {k} slots")
    valid = valid_mask(g)
    if extra == 0:
        return replace(g, valid=valid)

    def grow(t: Tensor, fill: float) -> Tensor:
        return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), fill)], 1)

    return Gaussians(grow(g.means, 0.0), grow(g.scales, 1e-3), grow(g.angles, 0.0), grow(g.colors, 0.0),
                     grow(g.opacities, 0.0), torch.cat([valid, valid.new_zeros(valid.shape[0], extra)], 1))


def decode(raw: Tensor, scale_factor: float = 1.0) -> Gaussians:
    """Decode raw 9-vectors ``[..., k, 9]`` (any number of leading dims) to :class:`Gaussians`.

    means = tanh(p), scales = scale_factor * sigmoid(s), angle = phi, colors = sigmoid(rgb),
    opacity = sigmoid(o). Differentiable.
    """
    if raw.ndim < 2 or raw.shape[-1] != RAW_DIM:
        raise ValueError(f"raw: expected shape [..., k, {RAW_DIM}] {RAW_LAYOUT}, got {tuple(raw.shape)}")
    if not scale_factor > 0:
        raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
    return Gaussians(
        means=torch.tanh(raw[..., POS]),
        scales=scale_factor * torch.sigmoid(raw[..., SCALE]),
        angles=raw[..., ANGLE].squeeze(-1),
        colors=torch.sigmoid(raw[..., COLOR]),
        opacities=torch.sigmoid(raw[..., OPACITY]).squeeze(-1),
    )


def encode(g: Gaussians, scale_factor: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Inverse of :func:`decode` for 3-channel Gaussians: decoded parameters -> raw ``[..., k, 9]``.

    Values on the boundary of a decoded range (means of +-1, scales of 0 or ``scale_factor``,
    colours and opacities of 0 or 1) are pulled inside by ``eps`` so the result is finite.
    """
    if g.channels != 3:
        raise ValueError(f"encode: the raw layout holds 3 colour channels, got {g.channels}")
    if not scale_factor > 0:
        raise ValueError(f"scale_factor must be > 0, got {scale_factor}")

    def logit(p: Tensor) -> Tensor:
        p = p.clamp(eps, 1 - eps)
        return torch.log(p) - torch.log1p(-p)

    return torch.cat(
        [
            torch.atanh(g.means.clamp(-1 + eps, 1 - eps)),
            logit(g.scales / scale_factor),
            g.angles.unsqueeze(-1),
            logit(g.colors),
            logit(g.opacities).unsqueeze(-1),
        ],
        dim=-1,
    )


def rotation(angles: Tensor) -> Tensor:
    """Rotation matrices ``[..., 2, 2]`` turning +x toward +y by ``angles`` (radians)."""
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def covariance(scales: Tensor, angles: Tensor) -> Tensor:
    """Sigma = R diag(sx^2, sy^2) R^T, ``[..., 2, 2]``, in normalised units squared."""
    r = rotation(angles)
    return r @ torch.diag_embed(scales.square()) @ r.transpose(-1, -2)


def conic(scales: Tensor, angles: Tensor) -> Tensor:
    """Upper triangle ``(a, b, c)`` of Sigma^-1 = [[a, b], [b, c]], shape ``[..., 3]``.

    Computed as R diag(1/sx^2, 1/sy^2) R^T, which needs no determinant and stays accurate for
    very thin Gaussians.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    ix, iy = scales[..., 0].square().reciprocal(), scales[..., 1].square().reciprocal()
    return torch.stack([cos * cos * ix + sin * sin * iy, cos * sin * (ix - iy), sin * sin * ix + cos * cos * iy], -1)


def det_covariance(scales: Tensor) -> Tensor:
    """det(Sigma) = (sx * sy)^2, ``[...]``: small for Gaussians that shrank onto detail."""
    return (scales[..., 0] * scales[..., 1]).square()


G0_LAYOUTS = ("uniform", "stratified", "grid")


def grid_shape(k: int) -> tuple[int, int]:
    """Rows and columns of g0's grid for k Gaussians: r = floor(sqrt(k)), c = ceil(k / r)."""
    rows = max(1, math.isqrt(k))
    return rows, -(-k // rows)


def grid_centres(k: int) -> Tensor:
    """``[k, 2]`` (x, y) centres in (-1, 1) of the first k cells of :func:`grid_shape`, row-major."""
    rows, cols = grid_shape(k)
    i = torch.arange(k)
    return torch.stack([((i % cols) + 0.5) / cols, ((i // cols) + 0.5) / rows], -1) * 2 - 1


def sample_initial(
    batch_size: int,
    num_gaussians: int,
    *,
    scale_factor: float = 1.0,
    layout: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random raw Gaussians g0 ``[B, k, 9]`` for the denoising encoder (GViT 2.2).

    Decoded, the means are uniform over the image (|x|, |y| <= 0.95), the scales are
    ``scale_factor * sigmoid(N(-2, 0.5))`` (about 0.12 * c: a few Gaussians' widths across the
    image for k in the hundreds), the angles uniform in [-pi, pi), and colours and opacities
    are ``sigmoid(N(0, 1))``.

    ``layout="stratified"`` draws the means from a jittered grid instead: the image is cut into
    ``r x c`` cells (r = floor(sqrt(k)), c = ceil(k / r)), k distinct cells are picked at random
    and each mean is uniform inside its cell, so every draw covers the image evenly; the slot
    order stays random. ``layout="grid"`` is the same draw with the slots in row-major cell
    order, so slot i always lies near the same place (as a patch token does, which gives the
    classifier's position embeddings a meaning). The other fields are drawn as above.
    """
    if batch_size < 0 or num_gaussians < 1:
        raise ValueError(f"batch_size must be >= 0 and num_gaussians >= 1, got {batch_size}, {num_gaussians}")
    if layout not in G0_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(G0_LAYOUTS)}, got {layout!r}")
    shape = (batch_size, num_gaussians)
    kw = dict(generator=generator, device=device, dtype=dtype)
    unit = torch.rand(*shape, 2, **kw)  # position inside the image (uniform) or inside the cell
    if layout in ("stratified", "grid"):
        rows, cols = grid_shape(num_gaussians)
        cells = torch.rand(batch_size, rows * cols, generator=generator, device=device).argsort(1)[:, :num_gaussians]
        if layout == "grid":
            cells = cells.sort(1).values
        cell_xy = torch.stack([cells % cols, cells // cols], -1).to(dtype)
        unit = (cell_xy + unit) / torch.tensor([cols, rows], dtype=dtype, device=device)
    pos = torch.atanh(0.95 * (2 * unit - 1))
    scale = -2.0 + 0.5 * torch.randn(*shape, 2, **kw)
    angle = math.pi * (2 * torch.rand(*shape, 1, **kw) - 1)
    color = torch.randn(*shape, 3, **kw)
    opacity = torch.randn(*shape, 1, **kw)
    return torch.cat([pos, scale, angle, color, opacity], dim=-1)


# --------------------------------------------------------------------------- files

_FIELDS = ("means", "scales", "angles", "colors", "opacities")


def save_gaussians(
    path: str | os.PathLike,
    gaussians: Gaussians,
    *,
    labels: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a batch of Gaussian sets to a safetensors file, atomically.

    ``dtype`` is torch.float32 or torch.float16 for the parameters. ``labels`` ``[B]`` (int)
    and string ``metadata`` travel with them. The file is written to a temporary name in the
    same folder and renamed, so a reader never sees half a file.
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    validate_gaussians(gaussians, source=str(path))
    tensors = {name: getattr(gaussians, name).detach().to("cpu", dtype).contiguous() for name in _FIELDS}
    if gaussians.valid is not None:
        tensors["valid"] = gaussians.valid.detach().to("cpu", torch.bool).contiguous()
    if labels is not None:
        if labels.shape != (gaussians.batch_size,):
            raise ValueError(f"labels: expected shape ({gaussians.batch_size},), got {tuple(labels.shape)}")
        tensors["labels"] = labels.detach().to("cpu", torch.int64).contiguous()
    write_safetensors(path, tensors, file_format=FILE_FORMAT, version=FILE_VERSION, metadata=metadata)


def load_gaussians(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Read a file written by :func:`save_gaussians`: returns ``(gaussians, labels, metadata)``.

    Loading runs no code (safetensors). Shapes and ranges are checked; a file that fails a
    check raises ValueError naming the file and the field.
    """
    tensors, meta = read_safetensors(path, file_format=FILE_FORMAT, what="Gaussian file")
    g, labels = gaussians_from_tensors(tensors, source=str(path), dtype=dtype)
    return g, labels, meta


def gaussians_from_tensors(tensors: dict[str, Tensor], *, source: str, dtype: torch.dtype = torch.float32):
    """``(gaussians, labels)`` from the tensors of a Gaussian file or of decoded sets (``means``,
    ``scales``, ``angles``, ``colors``, ``opacities``, optional ``valid`` and ``labels``), checked as
    :func:`load_gaussians` checks a file (ValueError naming ``source`` and the field)."""
    path = source
    missing = [name for name in _FIELDS if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    for name in _FIELDS:  # before any conversion: an int or bool field is not silently made float
        if not tensors[name].is_floating_point():
            raise ValueError(f"{path}: {name} must be floating point, got {tensors[name].dtype}")
    g = Gaussians(**{name: tensors[name].to(dtype) for name in _FIELDS}, valid=tensors.get("valid"))
    validate_gaussians(g, source=str(path))
    if g.channels == 3 and ((g.colors < 0) | (g.colors > 1)).any():
        raise ValueError(f"{path}: RGB colours must lie in [0, 1]")
    labels = tensors.get("labels")
    integer = labels is not None and not labels.is_floating_point() and labels.dtype != torch.bool
    if labels is not None and (labels.shape != (g.batch_size,) or not integer):
        raise ValueError(f"{path}: labels must be integers of shape ({g.batch_size},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return g, labels


def validate_gaussians(g: Gaussians, *, source: str = "gaussians") -> None:
    """Raise ValueError (naming ``source`` and the field) unless ``g`` is a well-formed batch."""
    if g.means.ndim != 3 or g.means.shape[-1] != 2:
        raise ValueError(f"{source}: means must be [B, k, 2], got {tuple(g.means.shape)}")
    b, k = g.means.shape[:2]
    expected = {"scales": (b, k, 2), "angles": (b, k), "opacities": (b, k)}
    for name, shape in expected.items():
        if tuple(getattr(g, name).shape) != shape:
            raise ValueError(f"{source}: {name} must have shape {shape}, got {tuple(getattr(g, name).shape)}")
    if g.colors.ndim != 3 or g.colors.shape[:2] != (b, k) or g.colors.shape[2] < 1:
        raise ValueError(f"{source}: colors must be [B, k, C] with B={b}, k={k}, got {tuple(g.colors.shape)}")
    if g.valid is not None and (g.valid.shape != (b, k) or g.valid.dtype != torch.bool):
        raise ValueError(
            f"{source}: valid must be a bool tensor of shape {(b, k)}, got {g.valid.dtype} {tuple(g.valid.shape)}"
        )
    for name in _FIELDS:
        t = getattr(g, name)
        if not t.is_floating_point():
            raise ValueError(f"{source}: {name} must be floating point, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}: {name} contains NaN or inf")
    if (g.means.abs() > 1).any():
        raise ValueError(f"{source}: means must lie in [-1, 1] (normalised coordinates)")
    if (g.scales <= 0).any():
        raise ValueError(f"{source}: scales must be > 0")
    if ((g.opacities < 0) | (g.opacities > 1)).any():
        raise ValueError(f"{source}: opacities must lie in [0, 1]")


def compression_ratio(counts: Tensor, height: int, width: int, *, bytes_per_value: int = 2,
                      values_per_gaussian: int = RAW_DIM) -> Tensor:
    """Pixel bytes (8-bit RGB) over Gaussian bytes (``values_per_gaussian`` values of
    ``bytes_per_value`` each), per image: above 1 means the Gaussians are smaller."""
    return (3.0 * height * width) / (counts.double().clamp_min(1) * values_per_gaussian * bytes_per_value)
