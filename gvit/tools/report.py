"""The report of a trained model: accuracy, reconstructions, Gaussian overlays, training curves.

``training_report(checkpoint, out)`` evaluates a checkpoint written by :func:`gvit.train.train`
on its evaluation split and writes, into ``out``:

* ``report.html`` (open it in a browser) and ``report.json`` (the same figures, for scripts);
* ``examples.png``: for the first test images, input | reconstruction | 2-sigma ellipses of
  the Gaussians | CDAM map of the predicted class (GViT, :func:`gvit.explain.explain_images`), with
  the true and predicted class (patch ViT: the inputs only);
* with ``compare``, a table of other runs trained with the same budget (the demo's patch ViT);
* ``curves.png``: the losses of ``metrics.jsonl`` against the step, phases shaded;
* ``guidance.png`` (a GViT run with a guidance phase; the paper's Fig. 4): for the first test
  images, the image | Gaussians fitted to it by reconstruction alone (``gvit fit``, same k) | the
  encoder's Gaussians before the guidance phase | after it, as 2-sigma ellipses, with the share of
  opacity on the object where the images have masks.

matplotlib draws the figures (non-interactive Agg backend); every file is written atomically.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import torch

from ..data import dataset_masks
from ..explain import explain_images, object_share
from ..files import output_folder, write_json
from ..fit import FitConfig, fit_gaussians
from ..models import GViT
from ..train import evaluate, load_trained
from ..train.data import split_name
from ..viz import draw_ellipses
from .artifacts import html_page, html_table, pyplot, save_figure

__all__ = ["training_report", "predict"]


_RUN_KEYS = {"step", "finished", "bad_steps", "train_seconds", "split_note", "eval_split"}


def predict(trained, images: torch.Tensor, *, seed: int | None = None) -> dict:
    """Run a trained image model on ``images [B, 3, H, W]`` in [0, 1]: ``logits`` and, for GViT,
    what :meth:`gvit.models.GViT.predict` gives (Gaussians ``g``, ``rendered``, ``psnr``), with g0
    drawn from a generator seeded with ``seed`` (the config's seed by default)."""
    gen = torch.Generator().manual_seed(trained.cfg.seed if seed is None else seed)
    return trained.step.predict_images(images, gen)


def _examples_figure(path: Path, images, labels, logits, classes, maps: dict | None) -> None:
    plt = pyplot()
    n = len(images)
    gvit = maps is not None
    cols = 4 if gvit else 1
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    top = logits.softmax(-1).max(-1)
    for i in range(n):
        guess = int(logits[i].argmax())
        title = f"{classes[int(labels[i])]} -> {classes[guess]} ({100 * float(top.values[i]):.0f}%)"
        axes[i][0].imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_title(title, fontsize=8, color="black" if guess == int(labels[i]) else "red")
        if gvit:
            size = images.shape[-1]
            axes[i][1].imshow(maps["rendered"][i].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i][1].set_title(f"render {float(maps['psnr'][i]):.1f} dB", fontsize=8)
            axes[i][2].imshow(draw_ellipses(images[i], maps["gaussians"][i]))
            axes[i][2].set_title(f"{maps['gaussians'].num_gaussians} Gaussians (2 sigma)", fontsize=8)
            cam = maps["cdam_map"][i].numpy()
            bound = max(abs(float(cam.min())), abs(float(cam.max())), 1e-12)
            axes[i][3].imshow(images[i].permute(1, 2, 0).numpy() * 0.5 + 0.25, interpolation="nearest",
                              extent=(0, size, size, 0))
            axes[i][3].imshow(cam, cmap="RdBu_r", vmin=-bound, vmax=bound, alpha=0.75, interpolation="nearest",
                              extent=(0, size, size, 0))
            axes[i][3].set_title(f"CDAM: {classes[guess]}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    save_figure(path, fig)


def _guidance_figure(path: Path, images, columns: dict, masks) -> None:
    """Rows of image | one 2-sigma ellipse panel per entry of ``columns`` (name -> Gaussians),
    titled with the share of opacity on the object when ``masks`` is given."""
    plt = pyplot()
    n, cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    shares = {name: None if masks is None else object_share(g, masks) for name, g in columns.items()}
    for i in range(n):
        axes[i][0].imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_title("image", fontsize=8)
        for ax, (name, g) in zip(axes[i][1:], columns.items()):
            ax.imshow(draw_ellipses(images[i], g[i]))
            share = "" if shares[name] is None else f"\n{100 * float(shares[name][i]):.0f}% on the object"
            ax.set_title(name + share, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    save_figure(path, fig)


def _curves_figure(path: Path, metrics: list[dict]) -> bool:
    plt = pyplot()
    keys = [k for k in ("loss_rec", "loss_cls", "val_top1") if any(k in m for m in metrics)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for shown in ((key,) if key != "val_top1" else ("train_top1", "val_top1")):  # top-1: train beside val
            rows = [m for m in metrics if shown in m]
            ax.plot([m["step"] for m in rows], [m[shown] for m in rows], lw=1.2, label=shown.replace("_top1", ""))
        if key == "val_top1":
            ax.legend(fontsize=7)
        seen = set()
        for m in metrics:  # mark where each phase is first logged
            if "phase" in m and m["phase"] not in seen:
                seen.add(m.get("phase"))
                ax.axvline(m["step"], color="0.8", lw=0.8)
                ax.text(m["step"], 1, f" {m.get('phase')}", fontsize=7, rotation=90, va="top", ha="left",
                        color="0.4", transform=ax.get_xaxis_transform())
        ax.set_xlabel("step")
        ax.set_title({"loss_rec": "reconstruction loss", "loss_cls": "classification loss",
                      "val_top1": "top-1 (eval_every)"}[key], fontsize=9)
    save_figure(path, fig)
    return True


def training_report(checkpoint: str | os.PathLike, out: str | os.PathLike, *, num_examples: int = 8,
                    overrides: list[str] | None = None, device=None, compare: dict[str, dict] | None = None,
                    evaluation: dict | None = None, overwrite: bool = False) -> dict:
    """Evaluate ``checkpoint`` and write the report files into ``out``; returns the summary.
    ``compare``: results of other runs with the same budget (name -> ``{"top1", "train_seconds", ...}``
    as :func:`gvit.train.train` returns them), shown in a table beside this one. ``evaluation``: the
    result :func:`gvit.train.train` returned for this checkpoint (its measures on the same split),
    used instead of evaluating it again."""
    with output_folder(out, "report", settings={"checkpoint": str(checkpoint), "overrides": overrides},
                       inputs=[checkpoint], continues=True, overwrite=overwrite):
        return _training_report(Path(checkpoint), Path(out), num_examples, overrides, device, compare, evaluation)


def _training_report(checkpoint: Path, out: Path, num_examples: int, overrides, device, compare, evaluation) -> dict:
    trained = load_trained(checkpoint, overrides, device)
    cfg, classes = trained.cfg, trained.classes
    if trained.kind.report_elsewhere:
        raise ValueError(f"{checkpoint}: {trained.kind.report_elsewhere}")
    try:
        test_ds, collate = trained.test_data()
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc} to report on") from None
    summary = {"checkpoint": str(checkpoint), "model": cfg.model, "data": cfg.data, "classes": classes}
    if evaluation is not None and not overrides:  # the run's measures, less its bookkeeping and val ones
        summary.update({k: v for k, v in evaluation.items() if k not in _RUN_KEYS and not k.startswith("val_")})
        summary["eval_split"] = evaluation.get("eval_split") or split_name(test_ds, cfg.eval_split)
    else:
        summary.update(evaluate(trained.step, test_ds, collate), eval_split=split_name(test_ds, cfg.eval_split))
    n = min(num_examples, len(test_ds))
    files = {}
    if n and trained.step.reads_images:
        images, labels = collate([test_ds[i] for i in range(n)])
        if isinstance(trained.model, GViT):  # explain_images predicts with the same g0 as predict would
            maps = explain_images(trained.model, images, grid=8, seed=cfg.seed)
            logits = maps["logits"]
        else:
            maps, logits = None, predict(trained, images)["logits"].cpu()
        _examples_figure(out / "examples.png", images, labels, logits, classes, maps)
        files["examples"] = "examples.png"
        around = trained.step.gaussians_around_guidance(images) if trained.kind.makes_gaussians else None
        if around is not None:
            fitted = fit_gaussians(images, FitConfig(num_gaussians=cfg.num_gaussians, recipe="small"), progress=False)
            masks = dataset_masks(test_ds)
            _guidance_figure(out / "guidance.png", images, {"fitted (reconstruction)": fitted.gaussians} | around,
                             None if masks is None else masks[:n])
            files["guidance"] = "guidance.png"
    metrics_path = checkpoint.parent / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics and _curves_figure(out / "curves.png", metrics):
            files["curves"] = "curves.png"
        if metrics and "seconds" in metrics[-1]:
            summary["train_seconds"] = metrics[-1]["seconds"]
            summary["steps"] = metrics[-1]["step"]
    summary["files"] = files
    result_path = checkpoint.parent / "result.json"
    if result_path.is_file():  # the run's own evaluation: its val measures (when it carved a val split) and train ones
        recorded = json.loads(result_path.read_text())
        summary |= {k: v for k, v in recorded.items() if k not in summary and (
            k.startswith("val_") or k in ("train_top1", "train_loss", "train_eval_images"))}
    if "guidance_shift_px" in summary:  # what the guidance phase did to the Gaussians of these images
        summary["guidance"] = guidance_summary(summary)
    if compare:
        summary["compare"] = {name: {k: r[k] for k in ("top1", "val_top1", "train_top1", "loss", "train_loss", "psnr",
                                                      "train_seconds", "step") if k in r}
                              for name, r in compare.items()}
    write_json(out / "report.json", summary)
    _html(out / "report.html", summary, cfg)
    return summary


GUIDANCE_VIEWS = {"encoder": "", "classifier_input": "fitted_"}  # the encoder's Gaussians; after test-time fitting
# a run's measures of one view -> their names in report.json's guidance section
GUIDANCE_KEYS = {"guidance_shift_px": "shift_px", "control_shift_px": "control_shift_px",
                 "guidance_vs_control_px": "guidance_vs_control_px", "object_share": "object_share",
                 "object_share_before_guidance": "object_share_before", "object_share_control": "object_share_control"}


def guidance_summary(measures: dict) -> dict:
    """``report.json``'s ``guidance`` section from a run's flat measures (:meth:`gvit.train.gvit_step.GViTStep.
    guidance_effect`): for the encoder's Gaussians and for the classifier's input (after test-time fitting),
    ``shift_px`` (over the phase), ``object_share`` and ``object_share_before``; with a gamma = 0 control
    also ``control_shift_px``, ``guidance_vs_control_px``, ``object_share_control`` and the differences
    ``shift_px_minus_control`` and ``object_share_minus_control``; the control's ``top1`` beside this run's
    (``top1_minus_control``); ``lr_share``."""
    out = {"lr_share": measures.get("guidance_lr_share"), "gamma": measures.get("guidance_gamma")}
    for view, prefix in GUIDANCE_VIEWS.items():
        m = {key[len(prefix):]: value for key, value in measures.items() if key.startswith(prefix)}
        if "guidance_shift_px" not in m:
            continue
        part = {name: m[key] for key, name in GUIDANCE_KEYS.items() if key in m}
        if "control_shift_px" in part:
            part["shift_px_minus_control"] = part["shift_px"] - part["control_shift_px"]
        if "object_share_control" in part:
            part["object_share_minus_control"] = part["object_share"] - part["object_share_control"]
        out[view] = part
    if "control_top1" in measures and "top1" in measures:
        out |= {"top1": measures["top1"], "control_top1": measures["control_top1"],
                "top1_minus_control": measures["top1"] - measures["control_top1"]}
        out |= {k: measures[k] for k in ("control_loss", "control_psnr") if k in measures}
    return out


def guidance_rows(g: dict) -> list[tuple[str, str]]:
    """The report's lines on the guidance phase (:func:`guidance_summary`): with a control, each measure
    against the control's."""
    rows = []
    if "control_top1" in g:
        rows.append((f"guidance phase (gamma {g['gamma']:g}) against its gamma = 0 control",
                     f"top-1 {100 * g['top1']:.2f}% against {100 * g['control_top1']:.2f}% "
                     f"({100 * g['top1_minus_control']:+.2f} points); the control took the same steps on the same "
                     f"batches from the same state, gamma = 0"))
    names = {"encoder": "the encoder's Gaussians", "classifier_input": "the classifier's Gaussians (after test-time "
                                                                         "fitting)"}
    for view, name in names.items():
        if view not in g:
            continue
        v = g[view]
        text = f"centres moved {v['shift_px']:.3f} px over the phase"
        if "control_shift_px" in v:
            text += (f" (control {v['control_shift_px']:.3f} px, difference {v['shift_px_minus_control']:+.3f} px; "
                     f"{v['guidance_vs_control_px']:.3f} px from the control's at the end)")
        if "object_share" in v:
            text += (f"; opacity on the object {100 * v['object_share']:.1f}% (at the phase's start "
                     f"{100 * v['object_share_before']:.1f}%")
            text += (f", control {100 * v['object_share_control']:.1f}%, difference "
                     f"{100 * v['object_share_minus_control']:+.1f} points)" if "object_share_control" in v else ")")
        rows.append((f"guidance phase: {name}", text))
    if g.get("lr_share") is not None:
        rows.append(("guidance steps' learning rate", f"{100 * g['lr_share']:.0f}% of the peak, on average"))
    return rows


def _html(path: Path, summary: dict, cfg) -> None:
    rows = [("model", summary["model"]), ("data", summary["data"]),
            ("top-1", f"{100 * summary['top1']:.2f}% of {summary['eval_images']} {summary['eval_split']} images")]
    if "val_top1" in summary:
        rows.append(("top-1 on val", f"{100 * summary['val_top1']:.2f}% of {summary['val_eval_images']} validation "
                                     "images (carved from the training images; what settings are chosen on)"))
    if "train_top1" in summary:
        rows.append(("top-1 on training images",
                     f"{100 * summary['train_top1']:.2f}% of {summary['train_eval_images']} (loss "
                     f"{summary['train_loss']:.3f}, against {summary['loss']:.3f} on {summary['eval_split']})"))
    if "psnr" in summary:
        rows.append(("reconstruction PSNR", f"{summary['psnr']:.2f} dB"))
    if "train_seconds" in summary:
        rows.append(("training", f"{summary['steps']} steps in {summary['train_seconds']:.0f} s"))
    if "guidance" in summary:
        rows += guidance_rows(summary["guidance"])
    compared = ""
    if summary.get("compare"):
        def val(r, key="val_top1"):
            return f"{100 * r[key]:.2f}%" if key in r else "-"

        table = [("run", f"top-1 ({summary['eval_split']})", "top-1 (val)", "top-1 (train)", "PSNR", "training")]
        table.append((f"this run ({summary['model']})", f"{100 * summary['top1']:.2f}%", val(summary),
                      val(summary, "train_top1"),
                      f"{summary['psnr']:.2f} dB" if "psnr" in summary else "-",
                      f"{summary.get('train_seconds', float('nan')):.0f} s"))
        for name, r in summary["compare"].items():
            table.append((name, f"{100 * r['top1']:.2f}%", val(r), val(r, "train_top1"),
                          f"{r['psnr']:.2f} dB" if "psnr" in r else "-",
                          f"{r.get('train_seconds', float('nan')):.0f} s"))
        compared = f"<h2>same budget</h2><table>{html_table(table)}</table>\n"
    figures = "".join(f'<h2>{html.escape(name)}</h2><img src="{html.escape(file)}" alt="{html.escape(name)}">\n'
                      for name, file in summary["files"].items())
    body = (f"<table>{html_table(rows)}</table>\n{compared}{figures}<details><summary>configuration</summary>"
            f"<table>{html_table(list(cfg.to_dict().items()))}</table></details>")
    html_page(path, "gvit report", body)
