"""The paper's leakage tests (3.2, Table 4): does the classifier read hidden "cheat codes" in the
Gaussians, or the picture they draw?

Two frozen collections of Gaussians of the same images: *SGD* Gaussians (fitted per image by
``gvit fit-dataset``) and *learned* Gaussians (the trained encoder of a GViT checkpoint, written
by :func:`encode_like` in the same shard format, image for image). Then

* experiment 1, cross-training: a Gaussian classifier trained on each collection, each evaluated
  on both test collections (a 2x2 matrix; a strong diagonal and similar off-diagonal drops mean
  the classifier reads structure both encodings share);
* experiment 2, rasterisation control: a patch ViT trained on the *renders* of each collection
  (``offline_input=renders``) against the classifier on the Gaussians themselves (a large drop
  would mean the parameters carry information the picture does not).

:func:`run_leakage` does it all into one folder, resumably (finished runs are kept), and writes
``leakage.md``, ``leakage.csv`` and ``leakage.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..data import open_dataset
from ..data.shards import load_shards, read_manifest, read_shard, shard_done, shard_name, write_manifest, write_shard
from ..data.transforms import resize_square
from ..files import output_folder, record_settings, write_json, write_text
from ..progress import progress_bar
from ..train import as_kind, evaluate_checkpoint, load_gvit, step_generator, train_or_reuse, with_overrides
from .artifacts import markdown_table, write_csv

__all__ = ["encode_like", "run_leakage"]


@torch.no_grad()
def encode_like(checkpoint: str | os.PathLike, like: str | os.PathLike, out: str | os.PathLike, *,
                data: str | None = None, batch_size: int = 256, progress: bool = True) -> dict:
    """Write the Gaussians a GViT checkpoint's encoder predicts for exactly the images of the
    ``gvit fit-dataset`` folder ``like`` (same dataset indices, same shards) into ``out``.

    The images come from ``data`` (default: the dataset recorded in ``like``), resized to the
    model's image size; g0 of shard s is drawn from the run's generator of index s
    (:func:`gvit.train.step_generator`), so the output is reproducible. Finished shards are
    skipped on a rerun. Returns the manifest.
    """
    like, out = Path(like), Path(out)
    manifest = read_manifest(like)
    trained = load_gvit(checkpoint, device="cpu", job="the leakage tests")
    cfg, model = trained.cfg, trained.model
    source = data or manifest["settings"]["data"]
    split = manifest["settings"]["split"]
    settings = {"source": "encoder", "checkpoint": str(checkpoint), "like": str(like), "data": str(source),
                "split": split, "num_gaussians": cfg.num_gaussians, "image_size": cfg.image_size}
    record_settings(out / "settings.json", settings)
    dataset = open_dataset(source, split, val_every=manifest["settings"].get("val_every", 0))
    shards = manifest["shards"]
    bar = progress_bar(len(shards), desc=f"encode {split}", unit="shard", enabled=progress)
    for s, name in enumerate(shards):
        if shard_done(out / shard_name(s)):
            bar.update(1)
            continue
        _, labels, meta = read_shard(like / name)
        images = torch.stack([resize_square(dataset[i][0], cfg.image_size) for i in meta["indices"]])
        gen = step_generator(cfg.seed, s)
        raws, psnrs = [], []
        for b in range(0, len(images), batch_size):
            pred = model.predict(images[b:b + batch_size], generator=gen)
            raws.append(pred["g"].float())
            psnrs.append(pred["psnr"])
        write_shard(out, s, model.decode(torch.cat(raws)), labels, indices=meta["indices"], psnr=torch.cat(psnrs),
                    height=cfg.image_size, width=cfg.image_size, scale_factor=cfg.scale_factor, split=split,
                    data=str(source), source="encoder")
        bar.update(1)
    bar.close()
    return write_manifest(out, len(shards), settings, classes=manifest.get("classes"))


_RUNS = {  # name -> (trained on, classifier input)
    "gs_sgd": ("sgd", "gaussians"),
    "gs_learned": ("learned", "gaussians"),
    "img_sgd": ("sgd", "renders"),
    "img_learned": ("learned", "renders"),
}
_LABEL = {"sgd": "SGD Gaussians", "learned": "learned Gaussians"}


def run_leakage(checkpoint: str | os.PathLike, sgd_train: str | os.PathLike, sgd_test: str | os.PathLike,
                out: str | os.PathLike, *, overrides: list[str] | None = None, data: str | None = None,
                overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Both leakage experiments for a GViT checkpoint and SGD-fitted train / test folders.

    The four classifiers share the checkpoint's classifier settings (size, patch, batch, lr,
    steps, seed), which ``key=value`` ``overrides`` change (e.g. ``steps=400``). Every run goes
    to ``out/<run>/`` and is skipped when its ``result.json`` exists (or resumed from its
    checkpoint). Returns the figures written to ``leakage.json``.
    """
    settings = {"checkpoint": str(checkpoint), "sgd_train": str(sgd_train), "sgd_test": str(sgd_test),
                "overrides": overrides, "data": data}
    with output_folder(out, "leakage", settings=settings, inputs=[checkpoint, sgd_train, sgd_test], continues=True,
                       overwrite=overwrite):
        return _run_leakage(checkpoint, sgd_train, sgd_test, Path(out), overrides, data, progress, log)


def _run_leakage(checkpoint, sgd_train, sgd_test, out: Path, overrides, data, progress: bool, log) -> dict:
    gvit_cfg = load_gvit(checkpoint, device="cpu", job="the leakage tests").cfg
    folders = {"sgd": {"train": Path(sgd_train), "test": Path(sgd_test)},
               "learned": {"train": out / "learned_train", "test": out / "learned_test"}}
    for split, folder in folders["sgd"].items():
        g, _, _, _ = load_shards(folder)
        if g.num_gaussians != gvit_cfg.num_gaussians:
            raise ValueError(f"{folder}: the SGD Gaussians have k = {g.num_gaussians} slots but the checkpoint's "
                             f"encoder predicts k = {gvit_cfg.num_gaussians}; fit them with --num-gaussians "
                             f"{gvit_cfg.num_gaussians} (the classifier needs the same k for both)")
    t0 = time.perf_counter()
    for split in ("train", "test"):
        encode_like(checkpoint, folders["sgd"][split], folders["learned"][split], data=data, progress=progress)
    base = as_kind(gvit_cfg, "offline", offline_train=str(sgd_train), limit_train=None, limit_eval=None)
    base = with_overrides(base, overrides)
    results = {}
    for name, (source, kind) in _RUNS.items():
        run_dir = out / name
        cfg = replace(base, offline_train=str(folders[source]["train"]), offline_eval=str(folders[source]["test"]),
                      offline_input=kind, out=str(run_dir))
        log(f"leakage: {name} ({kind} of the {_LABEL[source]})")
        results[name] = train_or_reuse(cfg, progress=progress, log=log)
    cross = {}
    for name, other in (("gs_sgd", "learned"), ("gs_learned", "sgd"), ("img_sgd", "learned"), ("img_learned", "sgd")):
        path = out / name / f"eval_on_{other}.json"
        if not path.is_file():
            write_json(path, evaluate_checkpoint(out / name / "checkpoint.pt",
                                                 [f"offline_eval={folders[other]['test']}"]))
        cross[name] = json.loads(path.read_text())
    figures = _figures(results, cross, base, sgd_train, sgd_test, checkpoint, time.perf_counter() - t0)
    _write_tables(out, figures)
    return figures


def _figures(results, cross, cfg, sgd_train, sgd_test, checkpoint, seconds) -> dict:
    def top1(name, on):
        native = _RUNS[name][0]
        return (results[name] if on == native else cross[name])["top1"]

    matrix = {t: {e: top1(f"gs_{t}", e) for e in ("sgd", "learned")} for t in ("sgd", "learned")}
    renders = {t: {e: top1(f"img_{t}", e) for e in ("sgd", "learned")} for t in ("sgd", "learned")}
    return {"checkpoint": str(checkpoint), "sgd_train": str(sgd_train), "sgd_test": str(sgd_test),
            "eval_images": results["gs_sgd"]["eval_images"], "steps": cfg.steps, "batch_size": cfg.batch_size,
            "classifier_size": cfg.classifier_size, "cross_training": matrix, "rasterisation": {
                t: {"gaussians": matrix[t][t], "renders": renders[t][t]} for t in ("sgd", "learned")},
            "renders_cross": renders, "seconds": seconds}


def _write_tables(out: Path, f: dict) -> None:
    m, r = f["cross_training"], f["rasterisation"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    cross = markdown_table(["trained on \\ evaluated on", "SGD Gaussians", "learned Gaussians"],
                           [[_LABEL[t], pct(m[t]["sgd"]), pct(m[t]["learned"])] for t in ("sgd", "learned")])
    control = markdown_table(["setup", "Gaussians (GS)", "renders (IMG)", "IMG - GS"],
                             [[f"trained on {_LABEL[t]}", pct(r[t]["gaussians"]), pct(r[t]["renders"]),
                               f"{100 * (r[t]['renders'] - r[t]['gaussians']):+.1f}"] for t in ("sgd", "learned")])
    write_text(out / "leakage.md",
               f"# Leakage tests\n\nClassifiers ({f['classifier_size']}, {f['steps']} steps of batch "
               f"{f['batch_size']}) on frozen Gaussians of the same images; top-1 (%) on {f['eval_images']} "
               f"test images.\n\n"
               f"## Experiment 1: cross-training\n\n{cross}\n## Experiment 2: rasterisation control\n\n{control}")
    rows = [
        ["cross_training", t, "gaussians", e, f"{m[t][e]:.4f}"] for t in ("sgd", "learned") for e in ("sgd", "learned")
    ]
    rows += [["rasterisation", t, kind, t, f"{r[t][kind]:.4f}"] for t in ("sgd", "learned")
             for kind in ("gaussians", "renders")]
    write_csv(out / "leakage.csv", ["experiment", "trained_on", "input", "evaluated_on", "top1"], rows)
    write_json(out / "leakage.json", f)
