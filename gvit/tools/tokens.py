"""``gvit tokens``: what a trained tokenizer (``model=tokenizer``) makes of images.

* :func:`encode_tokens` writes ``tokens.safetensors``: every image's code indices ``[N, k]`` and,
  for Gaussian kinds, their geometry (means, scales, angles; float32, conventions of
  :mod:`gvit.gaussians`), the labels, and metadata naming the tokenizer (kind, k, codebook size);
* :func:`decode_tokens` renders a token file back to images through the tokenizer's decoder
  (``decoded.png``, a grid, and ``decoded.safetensors``); decoding a file gives what the forward
  pass reconstructs;
* :func:`tokenizer_report` puts several tokenizers side by side (the A-D ablation): their
  measures, reconstructions of the same test images, and the Gaussian tokens of each Gaussian
  kind drawn as 2-sigma ellipses coloured by code.

Files load without running code (safetensors) and are checked field by field.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_path, output_folder, read_safetensors, write_json, write_safetensors
from ..gaussians import Gaussians
from ..progress import progress_bar
from ..train import load_trained
from ..viz import draw_ellipses, to_uint8
from .artifacts import html_page, html_table, pyplot, save_figure

__all__ = ["save_tokens", "load_tokens", "encode_tokens", "decode_tokens", "tokenizer_report", "load_tokenizer"]

TOKEN_FORMAT = "gvit-tokens"
TOKEN_VERSION = "1"
GEOMETRY = ("means", "scales", "angles")


def load_tokenizer(checkpoint, overrides: list[str] | None = None):
    """:func:`gvit.train.load_trained` for a ``model=tokenizer`` checkpoint (ValueError otherwise)."""
    trained = load_trained(checkpoint, overrides)
    if not trained.kind.tokenizes:
        raise ValueError(f"{checkpoint}: not a tokenizer checkpoint (model={trained.cfg.model!r})")
    return trained


def _describe(trained) -> dict:
    model = trained.model
    return {"kind": model.kind, "num_tokens": model.num_tokens, "num_codes": model.quantizer.num_codes,
            "image_size": model.image_size}


def save_tokens(path, indices: Tensor, *, labels: Tensor | None = None, geometry: dict | None = None,
                metadata: dict | None = None) -> None:
    """Write token indices ``[N, k]`` (and geometry, labels) to a safetensors file atomically."""
    tensors = {"indices": indices.detach().to("cpu", torch.int64).contiguous()}
    for name, value in (geometry or {}).items():
        tensors[name] = value.detach().to("cpu", torch.float32).contiguous()
    if labels is not None:
        tensors["labels"] = labels.detach().to("cpu", torch.int64).contiguous()
    write_safetensors(path, tensors, file_format=TOKEN_FORMAT, version=TOKEN_VERSION, metadata=metadata)


def load_tokens(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a token file; ValueError naming the file and the field when it is
    not one (shapes, integer indices, finite geometry)."""
    tensors, meta = read_safetensors(path, file_format=TOKEN_FORMAT, what="token file")
    indices = tensors.get("indices")
    if indices is None or indices.ndim != 2 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"{path}: indices must be an integer tensor [N, k]")
    n, k = indices.shape
    shapes = {"means": (n, k, 2), "scales": (n, k, 2), "angles": (n, k)}
    for name, shape in shapes.items():
        if name in tensors:
            value = tensors[name]
            if tuple(value.shape) != shape or not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{path}: {name} must be finite floats of shape {shape}, got {value.dtype} "
                                 f"{tuple(value.shape)}")
    if "scales" in tensors and (tensors["scales"] <= 0).any():
        raise ValueError(f"{path}: scales must be > 0")
    if "labels" in tensors and tuple(tensors["labels"].shape) != (n,):
        raise ValueError(f"{path}: labels must have shape ({n},)")
    return tensors, meta


def _batches(trained, limit: int | None, batch_size: int):
    dataset, collate = trained.test_data()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate), count


@torch.no_grad()
def encode_tokens(checkpoint, out, *, overrides: list[str] | None = None, limit: int | None = None,
                  batch_size: int = 256, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode the tokenizer's evaluation split (``overrides`` such as ``data=...``,
    ``eval_split=train`` choose another) into ``<out>/tokens.safetensors``; returns a summary."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    trained = load_tokenizer(checkpoint, overrides)
    model = trained.model
    settings = {"checkpoint": str(checkpoint), "overrides": overrides or [], "limit": limit}
    with output_folder(out, "tokens-encode", settings=settings, inputs=[checkpoint], overwrite=overwrite) as folder:
        loader, count = _batches(trained, limit, batch_size)
        parts: dict[str, list[Tensor]] = {}
        gen = torch.Generator().manual_seed(trained.cfg.seed)
        bar = progress_bar(count, desc="encode", unit="img", enabled=progress)
        for images, labels in loader:
            encoded = model.encode(images.to(next(model.parameters()).device), gen)
            parts.setdefault("indices", []).append(encoded.indices.cpu())
            parts.setdefault("labels", []).append(labels)
            for name in GEOMETRY:
                if getattr(encoded, name) is not None and model.stored_geometry:
                    parts.setdefault(name, []).append(getattr(encoded, name).float().cpu())
            bar.update(len(labels))
        bar.close()
        tensors = {name: torch.cat(values) for name, values in parts.items()}
        summary = _describe(trained) | {"images": count, "bits_per_image": model.bits_per_image(),
                                        "checkpoint": str(checkpoint)}
        save_tokens(folder / "tokens.safetensors", tensors.pop("indices"), labels=tensors.pop("labels"),
                    geometry=tensors, metadata=summary)
        write_json(folder / "summary.json", summary)
    return summary


@torch.no_grad()
def decode_tokens(checkpoint, tokens, out, *, limit: int | None = None, overwrite: bool = False) -> dict:
    """Decode the token file ``tokens`` with the tokenizer of ``checkpoint`` (the same kind, k and
    codebook size, else ValueError) into ``<out>/decoded.safetensors`` (images ``[N, 3, H, W]``)
    and ``decoded.png`` (the first 64 as a grid)."""
    from safetensors.torch import save_file

    trained = load_tokenizer(checkpoint)
    model = trained.model
    tensors, meta = load_tokens(tokens)
    expected = _describe(trained)
    for key in ("kind", "num_tokens", "num_codes"):
        if key in meta and str(meta[key]) != str(expected[key]):
            raise ValueError(f"{tokens}: made by a tokenizer with {key}={meta[key]}, {checkpoint} has {expected[key]}")
    if tensors["indices"].shape[1] != model.num_tokens:
        raise ValueError(
            f"{tokens}: {tensors['indices'].shape[1]} tokens per image, the tokenizer reads {model.num_tokens}"
        )
    n = len(tensors["indices"]) if limit is None else min(limit, len(tensors["indices"]))
    with output_folder(out, "tokens-decode", settings={"checkpoint": str(checkpoint), "tokens": str(tokens),
                                                      "limit": limit},
                       inputs=[checkpoint, tokens], overwrite=overwrite) as folder:
        device = next(model.parameters()).device
        decoded = []
        for start in range(0, n, 256):
            chunk = {name: value[start:min(n, start + 256)].to(device) for name, value in tensors.items()
                     if name in ("indices", *GEOMETRY)}
            decoded.append(model.decode(chunk.pop("indices"), **chunk).float().clamp(0, 1).cpu())
        images = torch.cat(decoded)
        with atomic_path(folder / "decoded.safetensors") as tmp:
            save_file({"images": images.contiguous()}, tmp)
        _grid(folder / "decoded.png", images[:64])
    return {"images": n, "out": str(out)}


def _grid(path, images: Tensor) -> None:
    import numpy as np

    from ..viz import save_png

    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    _, h, w = images.shape[1:]
    canvas = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    save_png(path, np.ascontiguousarray(to_uint8(canvas)))


def _code_colours(indices: Tensor, num_codes: int) -> list[tuple[int, int, int]]:
    """A hue per code (golden-ratio steps, so neighbouring indices differ)."""
    colours = []
    for code in indices.tolist():
        r, g, b = colorsys.hsv_to_rgb((code * 0.618034) % 1.0, 0.85, 1.0)
        colours.append((int(255 * r), int(255 * g), int(255 * b)))
    return colours


@torch.no_grad()
def tokenizer_report(checkpoints: list, out, *, names: list[str] | None = None, images: int = 8,
                     overwrite: bool = False) -> dict:
    """``report.html`` / ``report.json`` / ``reconstructions.png`` for tokenizers evaluated on the
    first tokenizer's evaluation split: one row per test image, one column per tokenizer (its
    reconstruction and PSNR), and for each Gaussian kind a column of its tokens (2-sigma ellipses
    coloured by code)."""
    if not checkpoints:
        raise ValueError("tokenizer report: no checkpoints")
    names = names or [Path(c).parent.name or str(c) for c in checkpoints]
    if len(names) != len(checkpoints):
        raise ValueError(f"tokenizer report: {len(names)} names for {len(checkpoints)} checkpoints")
    runs = [load_tokenizer(c) for c in checkpoints]
    with output_folder(out, "tokens-report", settings={"checkpoints": [str(c) for c in checkpoints], "names": names,
                                                       "images": images},
                       inputs=list(checkpoints), overwrite=overwrite) as folder:
        dataset, collate = runs[0].test_data()
        batch, _ = collate([dataset[i] for i in range(min(images, len(dataset)))])
        rows = []
        for name, run in zip(names, runs):
            result = run.evaluate()
            rows.append({"name": name, "kind": run.model.kind} | {k: result[k] for k in (
                "psnr", "ssim", "l1", "usage", "perplexity", "bits_per_image", "coverage", "eval_images")})
        _reconstruction_figure(folder / "reconstructions.png", batch, names, runs)
        write_json(folder / "report.json", {"tokenizers": rows})
        header = ["tokenizer", "kind", "PSNR (dB)", "SSIM", "L1", "codebook usage", "perplexity", "bits / image",
                  "map coverage"]
        table = [[r["name"], r["kind"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['l1']:.4f}",
                  f"{100 * r['usage']:.1f}%", f"{r['perplexity']:.0f}", f"{r['bits_per_image']:.0f}",
                  f"{100 * r['coverage']:.1f}%"] for r in rows]
        html_page(folder / "report.html", "gvit tokenizers",
                  f"<h1>Tokenizers</h1><p>{rows[0]['eval_images']} test images.</p><table>"
                  + html_table([header] + table) + '</table><h2>Reconstructions</h2><img src="reconstructions.png">')
    return {"tokenizers": rows, "out": str(out)}


def _reconstruction_figure(path, batch: Tensor, names: list[str], runs) -> None:
    plt = pyplot()
    gaussian_runs = [(n, r) for n, r in zip(names, runs) if r.model.gaussian_tokens]
    cols = 1 + len(runs) + len(gaussian_runs)
    fig, axes = plt.subplots(len(batch), cols, figsize=(2 * cols, 2 * len(batch)), squeeze=False)
    outputs = {}
    for name, run in zip(names, runs):
        run.model.eval()
        device = next(run.model.parameters()).device
        outputs[name] = run.model(batch.to(device), torch.Generator().manual_seed(run.cfg.seed))
    for i, image in enumerate(batch):
        axes[i][0].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_title("input", fontsize=8)
        for j, name in enumerate(names, start=1):
            rec = outputs[name].reconstruction[i].float().clamp(0, 1).cpu()
            mse = float((rec - image).square().mean())
            axes[i][j].imshow(rec.permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i][j].set_title(f"{name} {-10 * torch.log10(torch.tensor(max(mse, 1e-12))):.1f} dB", fontsize=8)
        for j, (name, run) in enumerate(gaussian_runs, start=1 + len(runs)):
            out = outputs[name]
            k = run.model.num_tokens
            tokens = Gaussians(out.means[i:i + 1].cpu(), out.scales[i:i + 1].cpu(), out.angles[i:i + 1].cpu(),
                               torch.zeros(1, k, 3), torch.ones(1, k))
            colours = _code_colours(out.indices[i].cpu(), run.model.quantizer.num_codes)
            axes[i][j].imshow(draw_ellipses(image, tokens, colors=colours, dim=0.5))
            axes[i][j].set_title(f"{name} tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    save_figure(path, fig)
