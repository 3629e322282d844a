"""Where the Gaussians went and which ones carried the decision (paper 4, Fig. 5).

* :func:`cdam`: Class-Discriminative Attention Map scores per Gaussian (after Brocki et al.):
  ``S_i = sum_j x_ij * d f_c / d x_ij`` with x the tokens fed to the classifier's last attention
  layer (in a pre-norm block: after its LayerNorm; the block's input itself would give S = 0 up to
  the LayerNorm's epsilon, since LayerNorm ignores a token's scale) and f_c the logit of class c.
* :func:`cell_map`: per-Gaussian values placed on a ``grid x grid`` map by the cell that holds
  each Gaussian's centre (values of Gaussians sharing a cell add up; empty cells are 0), the
  paper's 16x16 projection of CDAM.
* :func:`det_sigma_map`: the "shrinking-for-saliency" signal as an image: log det(Sigma) of the
  Gaussians, alpha-composited per pixel with the rasterizer (small values: small Gaussians).

Maps follow the image's orientation (row 0 at the top, :mod:`gvit.gaussians` conventions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussians import Gaussians, det_covariance
from .render import render

__all__ = ["cdam", "cell_map", "det_sigma_map", "explain_images", "explain_files"]


def cdam(classifier, g: Tensor, target: Tensor | int | None = None, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CDAM scores ``[B, k]`` of raw Gaussians ``g [B, k, 9]`` for class ``target`` (an int, a
    ``[B]`` tensor, or None for each set's predicted class); returns ``(scores, target)``.

    ``classifier`` is a :class:`gvit.models.GaussianClassifier`; the class token (when there is
    one) gets no score. The classifier's weights receive no gradient.
    """
    blocks = classifier.transformer.blocks
    captured = {}

    def keep_input(module, args):
        x = args[0]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        captured["x"] = x
        return (x, *args[1:])

    handle = blocks[-1].attn.register_forward_pre_hook(keep_input)
    try:
        with torch.enable_grad():
            logits = classifier(g.detach(), valid)
            if target is None:
                target = logits.argmax(-1)
            target = torch.as_tensor(target, device=logits.device).expand(len(logits))
            chosen = logits.gather(1, target[:, None]).sum()
            x = captured["x"]
            (grad,) = torch.autograd.grad(chosen, x)
    finally:
        handle.remove()
    scores = (x * grad).sum(-1).detach()
    k = g.shape[1]
    scores = scores[:, -k:]  # drop the class token
    if valid is not None:
        scores = scores * valid.to(scores.dtype)
    return scores, target


def _cell_index(means: Tensor, rows: int, cols: int) -> Tensor:
    """Row-major index ``[B, k]`` of the cell of a ``rows x cols`` grid over the image that holds
    each centre ``means [B, k, 2]`` (normalised; the image's edges belong to the edge cells)."""
    unit = (means.clamp(-1, 1 - 1e-6) + 1) / 2
    return (unit[..., 1] * rows).floor().long() * cols + (unit[..., 0] * cols).floor().long()


def cell_map(values: Tensor, means: Tensor, grid: int = 16, valid: Tensor | None = None) -> Tensor:
    """``values [B, k]`` at centres ``means [B, k, 2]`` (normalised) -> ``[B, grid, grid]`` sums per cell."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    b, k = values.shape
    index = _cell_index(means, grid, grid)
    v = values if valid is None else values * valid.to(values.dtype)
    out = torch.zeros(b, grid * grid, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, index, v)
    return out.view(b, grid, grid)


def det_sigma_map(gaussians: Gaussians, height: int, width: int) -> Tensor:
    """Per-pixel log det(Sigma) ``[B, H, W]`` of the Gaussians covering each pixel, alpha-composited
    with their opacities and normalised by the accumulated opacity (uncovered pixels: NaN).
    Sigma is in pixel units here, so the values read as log of squared pixel areas."""
    # det(D Sigma D) with D = diag(W/2, H/2), the normalised-to-pixel scaling
    logdet = (det_covariance(gaussians.scales) * (width * height / 4) ** 2).clamp_min(1e-12).log()
    ones = torch.ones_like(logdet)
    both = Gaussians(gaussians.means, gaussians.scales, gaussians.angles, torch.stack([logdet, ones], -1),
                     gaussians.opacities, gaussians.valid)
    out = render(both, height=height, width=width)
    weight = out[:, 1]
    return torch.where(weight > 1e-3, out[:, 0] / weight.clamp_min(1e-3), torch.full_like(weight, float("nan")))


# --------------------------------------------------------------------------- a trained model on images


def explain_images(cfg, run, images: Tensor, *, target: int | None = None, grid: int = 16, top: int = 5) -> dict:
    """Everything ``gvit explain`` draws, as tensors, for ``images [B, 3, S, S]`` (S = the model's
    image size) and a trained GViT (``cfg, run`` from :func:`gvit.train.load_trained`):

    ``g`` raw Gaussians ``[B, k, 9]``, ``gaussians`` (decoded), ``rendered [B, 3, S, S]``, ``psnr [B]``,
    ``logits [B, classes]``, ``top_classes`` / ``top_probs [B, top]``, ``target [B]`` (the class
    explained: ``target`` or the prediction), ``cdam [B, k]`` (per Gaussian), ``cdam_map
    [B, grid, grid]``, ``det_sigma [B, k]`` (normalised units), ``det_map [B, S, S]``
    (:func:`det_sigma_map`, pixel units, log).
    """
    from .gaussians import decode
    from .report import predict

    if cfg.model != "gvit":
        raise ValueError(f"explain needs a GViT checkpoint (model=gvit), got model={cfg.model!r}")
    num_classes = run.classifier.head.out_features
    if target is not None and not 0 <= target < num_classes:
        raise ValueError(f"class {target} out of range: the model has {num_classes} classes")
    out = predict(cfg, run, images)
    g = out["g"].float()
    gaussians = decode(g.cpu(), cfg.scale_factor)
    probs = out["logits"].float().softmax(-1).cpu()
    top_probs, top_classes = probs.topk(min(top, num_classes), dim=-1)
    scores, chosen = cdam(run.classifier, out["g"], target)
    scores = scores.float().cpu()
    size = images.shape[-2:]
    return {"g": g.cpu(), "gaussians": gaussians, "rendered": out["rendered"].float().cpu(),
            "psnr": out["psnr"].float().cpu(), "logits": out["logits"].float().cpu(), "top_classes": top_classes,
            "top_probs": top_probs, "target": chosen.cpu(), "cdam": scores,
            "cdam_map": cell_map(scores, gaussians.means, grid), "det_sigma": det_covariance(gaussians.scales),
            "det_map": det_sigma_map(gaussians, *size)}


def _panel(path, image: Tensor, maps: dict, i: int, classes: list[str], grid: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _figure
    from .viz import draw_ellipses

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
    top = ", ".join(f"{classes[int(c)]} {100 * float(p):.1f}%" for c, p in zip(maps["top_classes"][i], maps["top_probs"][i]))
    fig.suptitle(f"top-{len(maps['top_classes'][i])}: {top}", fontsize=11)
    _figure(path, fig)


def explain_files(checkpoint, inputs: list, out, *, target: int | str | None = None, grid: int = 16,
                  batch_size: int = 32, skip_bad: bool = False, progress: bool = True) -> dict:
    """``gvit explain``: one panel PNG per image (input, reconstruction, ellipses, det(Sigma) map,
    CDAM map, top-5) under ``out`` (named like the input, see :func:`gvit.convert.collect_images`),
    ``explain.json`` with the predictions and ``index.html`` showing every panel. Images of any
    size and mode are read as RGB (:func:`gvit.data.read_image`) and resized to the model's input
    size (squashed when not square). Unreadable files raise naming the file, or with
    ``skip_bad`` are listed and skipped. Returns the summary written to ``explain.json``."""
    import html
    import json
    from pathlib import Path

    from tqdm import tqdm

    from ._io import write_json, write_text
    from .convert import collect_images
    from .data import ImageReadError, read_image
    from .data.transforms import resize_square
    from .train import load_trained

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg, run, classes = load_trained(checkpoint)
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.image_size
    records, skipped = [], []
    bar = tqdm(total=len(jobs), desc="explain", unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch, names = [], []
        for path, name in jobs[start:start + batch_size]:
            try:
                img = read_image(path)
            except ImageReadError as exc:
                if not skip_bad:
                    raise
                skipped.append(str(exc))
                continue
            original = tuple(img.shape[-2:])
            batch.append(resize_square(img, size))
            names.append((path, name, original))
        if batch:
            images = torch.stack(batch)
            maps = explain_images(cfg, run, images, target=target, grid=grid)
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
    write_text(out / "index.html", f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gvit explain</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%}} figure{{margin:0 0 2em 0}}</style></head>
<body><h1>gvit explain</h1><p>{html.escape(str(checkpoint))}: {len(records)} image(s). Panels: input, reconstruction,
2-sigma ellipses of every Gaussian, log det(Sigma) per pixel (dark: small Gaussians), CDAM of the explained class on a
{grid}x{grid} grid (red: evidence for, blue: against).</p>
{cards}
</body></html>
""")
    return summary


# --------------------------------------------------------------------------- numbers over a test set


def rank_correlation(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Spearman rank correlation of ``a`` and ``b`` ``[B, k]`` along k, per row, over the valid
    slots: ``[B]`` (NaN for a row with fewer than 3 valid slots or a constant input)."""
    out = torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(a.shape[0]):
        keep = slice(None) if valid is None else valid[i]
        x, y = a[i][keep].double(), b[i][keep].double()
        if len(x) < 3:
            continue
        rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denom = (rx.square().sum() * ry.square().sum()).sqrt()
        if x.unique().numel() > 1 and y.unique().numel() > 1 and denom > 0:
            out[i] = (rx * ry).sum() / denom
    return out


def mask_mass(scores: Tensor, means: Tensor, masks: Tensor, valid: Tensor | None = None) -> dict:
    """How much of the positive CDAM evidence sits on the object. ``scores [B, k]``, centres
    ``means [B, k, 2]`` (normalised), object ``masks [B, H, W]`` (bool). Returns per image
    ``inside`` (positive score mass of the Gaussians centred on the object / all positive mass;
    NaN when no score is positive), ``gaussians_inside`` (fraction of the Gaussians centred on
    the object, the mass a score blind to the object would put there) and ``area`` (object
    pixels / all pixels)."""
    b, h, w = masks.shape
    on = masks.flatten(1).gather(1, _cell_index(means, h, w))  # [B, k]: the pixel under each centre
    keep = torch.ones_like(on) if valid is None else valid
    pos = scores.double().clamp_min(0) * keep
    total = pos.sum(1)
    inside = torch.where(total > 0, (pos * on).sum(1) / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    return {"inside": inside, "gaussians_inside": (on & keep).sum(1).double() / keep.sum(1).clamp_min(1),
            "area": masks.flatten(1).double().mean(1)}


def saliency_statistics(checkpoint, out=None, *, limit: int | None = 512, batch_size: int = 128,
                        overrides: list[str] | None = None, progress: bool = True) -> dict:
    """The paper's interpretability claims as numbers, over ``limit`` test images spread over the
    checkpoint's evaluation split (CDAM of the predicted class):

    * ``det_cdam_spearman``: per image, the rank correlation over the Gaussians of log det(Sigma)
      with the CDAM score (and with |CDAM|), then mean and std over the images. Negative values
      mean that the Gaussians carrying the evidence are the small ones ("shrinking for saliency").
    * on a dataset with object masks (the built-in shapes): ``cdam_mass_inside``, the share of
      the positive CDAM mass on Gaussians centred on the object, against two chance levels, the
      share of the Gaussians centred there and the object's share of the pixels.

    With ``out`` writes ``interpret.json`` and ``interpret.md`` there. Returns the figures."""
    from pathlib import Path

    from tqdm import tqdm

    from ._io import write_json, write_text
    from .data import open_dataset, spread_indices
    from .data.transforms import resize_square
    from .train import load_trained

    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1, got {batch_size}, {limit}")
    cfg, run, classes = load_trained(checkpoint, overrides)
    if cfg.model != "gvit":
        raise ValueError(f"interpret needs a GViT checkpoint (model=gvit), got model={cfg.model!r}")
    dataset = open_dataset(cfg.data, cfg.eval_split)
    order = spread_indices(len(dataset), min(limit or len(dataset), len(dataset)))
    masks_all = getattr(dataset, "masks", None)
    rho, rho_abs, correct, mass = [], [], 0, {"inside": [], "gaussians_inside": [], "area": []}
    for start in tqdm(range(0, len(order), batch_size), desc="interpret", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        items = [dataset[i] for i in idx]
        images = torch.stack([resize_square(img, cfg.image_size) for img, _ in items])
        labels = torch.tensor([label for _, label in items])
        maps = explain_images(cfg, run, images)
        correct += int((maps["logits"].argmax(-1) == labels).sum())
        logdet = maps["det_sigma"].clamp_min(1e-30).log()
        rho.append(rank_correlation(logdet, maps["cdam"]))
        rho_abs.append(rank_correlation(logdet, maps["cdam"].abs()))
        if masks_all is not None:
            for key, value in mask_mass(maps["cdam"], maps["gaussians"].means, masks_all[idx]).items():
                mass[key].append(value)

    def summary(values: list[Tensor]) -> dict:
        v = torch.cat(values)
        v = v[~v.isnan()]
        return {"mean": float(v.mean()) if len(v) else float("nan"),
                "std": float(v.std()) if len(v) > 1 else float("nan"), "images": int(len(v))}

    figures = {"checkpoint": str(checkpoint), "data": cfg.data, "split": cfg.eval_split, "images": len(order),
               "top1": correct / len(order), "num_gaussians": cfg.num_gaussians,
               "det_cdam_spearman": summary(rho), "det_abs_cdam_spearman": summary(rho_abs)}
    if masks_all is not None:
        figures["cdam_mass_inside"] = {key: summary(v) for key, v in mass.items()}
    if out is not None:
        out = Path(out)
        write_json(out / "interpret.json", figures)
        write_text(out / "interpret.md", _interpret_table(figures))
    return figures


def _interpret_table(f: dict) -> str:
    def row(name, s):
        return f"| {name} | {s['mean']:+.3f} | {s['std']:.3f} | {s['images']} |"

    lines = [f"# Interpretability in numbers\n\n{f['checkpoint']} on {f['images']} images of {f['data']} "
             f"({f['split']}), top-1 {100 * f['top1']:.1f}%, CDAM of the predicted class.\n",
             "| quantity | mean | std over images | images |", "|---|---|---|---|",
             row("Spearman(log det Sigma, CDAM) per image", f["det_cdam_spearman"]),
             row("Spearman(log det Sigma, abs CDAM) per image", f["det_abs_cdam_spearman"])]
    if "cdam_mass_inside" in f:
        m = f["cdam_mass_inside"]
        lines += [row("positive CDAM mass on object Gaussians", m["inside"]),
                  row("chance: share of Gaussians centred on the object", m["gaussians_inside"]),
                  row("chance: object share of the pixels", m["area"])]
    return "\n".join(lines) + "\n"
