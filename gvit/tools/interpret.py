"""``gvit interpret``: the paper's interpretability claims as numbers over a test set
(det(Sigma)-CDAM rank correlation; CDAM mass on the object where masks exist)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..data import open_dataset, spread_indices
from ..data.transforms import resize_square
from ..explain import explain_images, mask_mass, rank_correlation
from ..files import output_folder, write_json, write_text
from ..progress import progress_bar
from ..train import load_gvit
from .artifacts import markdown_table

__all__ = ["saliency_statistics"]


def saliency_statistics(checkpoint, out=None, *, limit: int | None = 512, batch_size: int = 128,
                        overrides: list[str] | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """The paper's interpretability claims as numbers, over ``limit`` test images spread over the
    checkpoint's evaluation split (CDAM of the predicted class):

    * ``det_cdam_spearman``: per image, the rank correlation over the Gaussians of log det(Sigma)
      with the CDAM score (and with |CDAM|), then mean and std over the images. Negative values
      mean that the Gaussians carrying the evidence are the small ones ("shrinking for saliency").
    * on a dataset with object masks (the built-in shapes): ``cdam_mass_inside``, the share of
      the positive CDAM mass on Gaussians centred on the object, against two chance levels, the
      share of the Gaussians centred there and the object's share of the pixels.

    With ``out`` writes ``interpret.json`` and ``interpret.md`` there. Returns the figures."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1, got {batch_size}, {limit}")
    if out is None:
        return _saliency_statistics(checkpoint, None, limit, batch_size, overrides, progress)
    settings = {"checkpoint": str(checkpoint), "limit": limit, "overrides": overrides}
    with output_folder(out, "interpret", settings=settings, inputs=[checkpoint], continues=True,
                       overwrite=overwrite):
        return _saliency_statistics(checkpoint, Path(out), limit, batch_size, overrides, progress)


def _saliency_statistics(checkpoint, out: Path | None, limit, batch_size: int, overrides, progress: bool) -> dict:
    trained = load_gvit(checkpoint, overrides, job="interpret")
    cfg = trained.cfg
    dataset = open_dataset(cfg.data, cfg.eval_split)
    order = spread_indices(len(dataset), min(limit or len(dataset), len(dataset)))
    masks_all = getattr(dataset, "masks", None)
    rho, rho_abs, correct, mass = [], [], 0, {"inside": [], "gaussians_inside": [], "area": []}
    bar = progress_bar(len(order), desc="interpret", unit="img", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        items = [dataset[i] for i in idx]
        images = torch.stack([resize_square(img, cfg.image_size) for img, _ in items])
        labels = torch.tensor([label for _, label in items])
        maps = explain_images(trained.model, images, seed=cfg.seed)
        correct += int((maps["logits"].argmax(-1) == labels).sum())
        logdet = maps["det_sigma"].clamp_min(1e-30).log()
        rho.append(rank_correlation(logdet, maps["cdam"]))
        rho_abs.append(rank_correlation(logdet, maps["cdam"].abs()))
        if masks_all is not None:
            for key, value in mask_mass(maps["cdam"], maps["gaussians"].means, masks_all[idx]).items():
                mass[key].append(value)
        bar.update(len(idx))
    bar.close()

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
        write_json(out / "interpret.json", figures)
        write_text(out / "interpret.md", _interpret_table(figures))
    return figures


def _interpret_table(f: dict) -> str:
    def row(name, s):
        return [name, f"{s['mean']:+.3f}", f"{s['std']:.3f}", s["images"]]

    rows = [row("Spearman(log det Sigma, CDAM) per image", f["det_cdam_spearman"]),
            row("Spearman(log det Sigma, abs CDAM) per image", f["det_abs_cdam_spearman"])]
    if "cdam_mass_inside" in f:
        m = f["cdam_mass_inside"]
        rows += [row("positive CDAM mass on object Gaussians", m["inside"]),
                 row("chance: share of Gaussians centred on the object", m["gaussians_inside"]),
                 row("chance: object share of the pixels", m["area"])]
    return (f"# Interpretability in numbers\n\n{f['checkpoint']} on {f['images']} images of {f['data']} "
            f"({f['split']}), top-1 {100 * f['top1']:.1f}%, CDAM of the predicted class.\n\n"
            + markdown_table(["quantity", "mean", "std over images", "images"], rows))
