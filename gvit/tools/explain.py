"""``gvit explain``: one panel per image (input, reconstruction, ellipses, det(Sigma) map, CDAM map,
top-5) of a trained GViT, ``explain.json`` and ``index.html``. The maps come from
:func:`gvit.explain.explain_images`."""

from __future__ import annotations

import html
from pathlib import Path

import torch
from torch import Tensor

from ..data import read_or_skip
from ..data.transforms import resize_square
from ..explain import explain_images
from ..files import output_folder, write_json
from ..progress import progress_bar
from ..train import load_gvit
from ..viz import draw_ellipses
from .artifacts import html_page, pyplot, save_figure
from .fit_files import collect_images

__all__ = ["explain_files"]


def _panel(path, image: Tensor, maps: dict, i: int, classes: list[str], grid: int) -> None:
    plt = pyplot()
    gaussians = maps["gaussians"][i]
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
    size = image.shape[-1]
    extent = (0, size, size, 0)
    axes[0].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest", extent=extent)
    axes[0].set_title("input (model size)", fontsize=9)
    axes[1].imshow(maps["rendered"][i].permute(1, 2, 0).numpy(), interpolation="nearest", extent=extent)
    axes[1].set_title(f"render {float(maps['psnr'][i]):.1f} dB", fontsize=9)
    axes[2].imshow(draw_ellipses(image, gaussians), extent=extent)
    axes[2].set_title(f"{gaussians.num_gaussians} Gaussians (2 sigma)", fontsize=9)
    det = axes[3].imshow(maps["det_map"][i].numpy(), cmap="magma", interpolation="nearest", extent=extent)
    axes[3].set_title("log det(Sigma), dark = small", fontsize=9)
    fig.colorbar(det, ax=axes[3], fraction=0.046)
    cam = maps["cdam_map"][i].numpy()
    bound = max(abs(float(cam.min())), abs(float(cam.max())), 1e-12)
    axes[4].imshow(image.permute(1, 2, 0).numpy() * 0.5 + 0.25, interpolation="nearest", extent=extent)
    shown = axes[4].imshow(cam, cmap="RdBu_r", vmin=-bound, vmax=bound, alpha=0.75, interpolation="nearest",
                           extent=extent)
    axes[4].set_title(f"CDAM: {classes[int(maps['target'][i])]}", fontsize=9)
    fig.colorbar(shown, ax=axes[4], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    top = ", ".join(
        f"{classes[int(c)]} {100 * float(p):.1f}%" for c, p in zip(maps["top_classes"][i], maps["top_probs"][i])
    )
    fig.suptitle(f"top-{len(maps['top_classes'][i])}: {top}", fontsize=11)
    save_figure(path, fig)


def explain_files(checkpoint, inputs: list, out, *, target: int | str | None = None, grid: int = 16,
                  batch_size: int = 32, skip_bad: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """``gvit explain``: one panel PNG per image (input, reconstruction, ellipses, det(Sigma) map,
    CDAM map, top-5) under ``out`` (named like the input, see :func:`gvit.tools.fit_files.collect_images`),
    ``explain.json`` with the predictions and ``index.html`` showing every panel. Images of any
    size and mode are read as RGB (:func:`gvit.data.read_image`) and resized to the model's input
    size (squashed when not square). Unreadable files raise naming the file, or with
    ``skip_bad`` are listed and skipped. Returns the summary written to ``explain.json``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    trained = load_gvit(checkpoint, job="explain")
    classes = trained.classes
    if isinstance(target, str):
        if target.isdigit():
            target = int(target)
        elif target in classes:
            target = classes.index(target)
        else:
            raise ValueError(f"--class {target!r}: not a class of this model ({', '.join(classes)})")
    jobs = collect_images(inputs)
    if not jobs:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    settings = {"checkpoint": str(checkpoint), "target": target, "grid": grid}
    with output_folder(out, "explain", settings=settings, inputs=[*inputs, checkpoint], continues=True,
                       overwrite=overwrite):
        return _explain(trained, checkpoint, jobs, Path(out), target, grid, batch_size, skip_bad, progress)


def _explain(trained, checkpoint, jobs, out: Path, target, grid: int, batch_size: int, skip_bad: bool,
             progress: bool) -> dict:
    cfg, classes = trained.cfg, trained.classes
    size = cfg.image_size
    records, skipped = [], []
    bar = progress_bar(len(jobs), desc="explain", unit="img", enabled=progress)
    for start in range(0, len(jobs), batch_size):
        batch, names = [], []
        for path, name in jobs[start:start + batch_size]:
            img = read_or_skip(path, skip_bad, skipped)
            if img is None:
                continue
            original = tuple(img.shape[-2:])
            batch.append(resize_square(img, size))
            names.append((path, name, original))
        if batch:
            images = torch.stack(batch)
            maps = explain_images(trained.model, images, target=target, grid=grid, seed=cfg.seed)
            for i, (path, name, original) in enumerate(names):
                png = out / f"{name}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                _panel(png, images[i], maps, i, classes, grid)
                records.append({"image": str(path), "panel": str(png.relative_to(out)), "size": list(original),
                                "explained_class": classes[int(maps["target"][i])],
                                "top5": [[classes[int(c)], round(float(p), 4)]
                                         for c, p in zip(maps["top_classes"][i], maps["top_probs"][i])],
                                "psnr": round(float(maps["psnr"][i]), 2)})
        bar.update(len(jobs[start:start + batch_size]))
    bar.close()
    summary = {"checkpoint": str(checkpoint), "classes": classes, "grid": grid, "images": records,
               "skipped": skipped}
    write_json(out / "explain.json", summary)
    cards = "\n".join(
        f'<figure><img src="{html.escape(r["panel"])}" alt="{html.escape(r["image"])}"><figcaption>'
        f'{html.escape(r["image"])}: ' + html.escape(", ".join(f"{c} {100 * p:.1f}%" for c, p in r["top5"]))
        + "</figcaption></figure>" for r in records)
    body = (f"<p>{html.escape(str(checkpoint))}: {len(records)} image(s). Panels: input, reconstruction, 2-sigma "
            f"ellipses of every Gaussian, log det(Sigma) per pixel (dark: small Gaussians), CDAM of the "
            f"explained class on a {grid}x{grid} grid (red: evidence for, blue: against).</p>\n{cards}")
    html_page(out / "index.html", "gvit explain", body)
    return summary
