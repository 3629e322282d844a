"""``gvit vl-eval``: GaussianVision's measures of splat-stage checkpoints (``model=splat_distill`` or
``model=splat_align``) on fitted test Gaussians, each beside the RGB teacher, against the
compression ratio.

One row per (checkpoint, Gaussian folder): the folder's k, mean count after pruning, PSNR, bytes
per image and compression against 8-bit pixels (from its manifest), then the student's and the
teacher's zero-shot top-1 (and on held-out attribute pairs; with the run's ``unseen_classes``, on the
classes training never saw, among them, and on the seen ones, among those), image <-> text recall@1/5/10, kNN and
linear probe on frozen embeddings (fitted on ``probe_images`` items of the run's own training
Gaussians), and the teacher-student cosine; ``*_ratio`` columns divide the student's figure by the
teacher's. A single checkpoint is evaluated on every folder; several are paired with the folders
one to one (a compression sweep trains one student per k). Rows are written as they finish
(``rows.jsonl``) and kept on a rerun; at the end ``vl_eval.json``, ``vl_eval.md``, ``vl_eval.csv``
and ``vl_eval.png`` (zero-shot top-1 relative to the teacher against compression).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.shards import read_manifest
from ..files import append_line, output_folder, write_json, write_text
from ..progress import progress_bar
from ..train import load_trained
from ..train.data import limit as limit_dataset
from ..train.splat_distill_step import DistillStep, PairedGaussians
from .artifacts import markdown_table, pyplot, save_figure, write_csv

__all__ = ["vl_eval", "VL_COLUMNS"]

# the measures of a row (student, and teacher_<name> for the RGB teacher); ratios are student / teacher
MEASURES = ("top1", "top1_held_out", "top1_unseen", "top1_seen", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
            "t2i_r10", "knn", "linear")
VL_COLUMNS = ("checkpoint", "gaussians", "k", "mean_count", "pruned", "mode", "psnr", "bytes", "compression",
              "eval_images", "cosine", *MEASURES, *(f"teacher_{m}" for m in MEASURES),
              "top1_ratio", "top1_held_out_ratio", "top1_unseen_ratio", "i2t_r1_ratio", "knn_ratio", "linear_ratio")


def vl_eval(checkpoints: list, gaussians: list, out, *, limit: int | None = None, overwrite: bool = False,
            progress: bool = True, log=print) -> dict:
    """Evaluate ``checkpoints`` on the ``gvit fit-dataset`` folders ``gaussians`` (see the module
    docstring); ``limit`` test items spread over each folder. Returns ``{"rows": [...]}``."""
    checkpoints, gaussians = [str(c) for c in checkpoints], [str(g) for g in gaussians]
    if not checkpoints or not gaussians:
        raise ValueError("vl-eval: give at least one --checkpoint and one --gaussians folder")
    if len(checkpoints) not in (1, len(gaussians)):
        raise ValueError(f"vl-eval: {len(checkpoints)} checkpoints for {len(gaussians)} Gaussian folders; give one "
                         "checkpoint, or one per folder")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    pairs = list(zip(checkpoints * len(gaussians) if len(checkpoints) == 1 else checkpoints, gaussians))
    for folder in gaussians:
        read_manifest(folder)  # every folder is finished, before anything runs
    settings = {"pairs": pairs, "limit": limit}
    with output_folder(out, "vl-eval", settings=settings, inputs=[*checkpoints, *gaussians], continues=True,
                       overwrite=overwrite):
        return _vl_eval(pairs, Path(out), limit, progress, log)


def _vl_eval(pairs, out: Path, limit, progress: bool, log) -> dict:
    done_path = out / "rows.jsonl"
    done = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["checkpoint"], row["gaussians"])] = row
    rows, loaded = [], {}
    bar = progress_bar(len(pairs), desc="vl-eval", unit="set", enabled=progress)
    for checkpoint, folder in pairs:
        if (checkpoint, folder) in done:
            log(f"{checkpoint} on {folder}: done before, kept")
            rows.append(done[(checkpoint, folder)])
            bar.update(1)
            continue
        if checkpoint not in loaded:
            loaded = {checkpoint: _load_stage(checkpoint)}  # one model in memory at a time
        step = loaded[checkpoint]
        row = evaluate_folder(step, checkpoint, folder, limit)
        append_line(done_path, json.dumps(row))  # appended whole lines: a killed run keeps every finished row
        rows.append(row)
        bar.update(1)
    bar.close()
    result = {"rows": rows}
    write_json(out / "vl_eval.json", result)
    write_csv(out / "vl_eval.csv", list(VL_COLUMNS), [{c: row.get(c, "") for c in VL_COLUMNS} for row in rows])
    write_text(out / "vl_eval.md", vl_table(rows))
    _plot(rows, out / "vl_eval.png")
    return result


def _load_stage(checkpoint: str) -> DistillStep:
    trained = load_trained(checkpoint)
    if not trained.kind.splat_student:
        raise ValueError(f"{checkpoint}: vl-eval needs a splat stage checkpoint (model=splat_distill or "
                         f"model=splat_align), got model={trained.cfg.model!r}")
    step, cfg = trained.step, trained.cfg
    if cfg.probe_images:  # kNN and linear probes fitted on the run's own training Gaussians
        step.set_probe_set(limit_dataset(PairedGaussians.for_run(cfg.offline_train, cfg, train=True), cfg.probe_images))
    return step


def evaluate_folder(step: DistillStep, checkpoint: str, folder: str, limit: int | None) -> dict:
    """One row of the table: the folder's size figures and the stage's measures on it."""
    data = PairedGaussians.for_run(folder, step.cfg, train=False)
    manifest = data.manifest
    fit = manifest["settings"]["fit"]
    if fit["mode"] != step.student.stem.mode:
        raise ValueError(f"{folder}: fitted in {fit['mode']} mode, but {checkpoint}'s stem reads "
                         f"{step.student.stem.mode} sets")
    compression = float(manifest["compression_vs_8bit"])
    metrics = step.evaluate(limit_dataset(data, limit), type(step).collate(step.cfg))
    row = {"checkpoint": checkpoint, "gaussians": folder, "k": int(fit["num_gaussians"]),
           "mean_count": float(manifest["mean_count"]), "pruned": fit.get("prune_tau") is not None,
           "mode": fit["mode"], "psnr": float(manifest["mean_psnr"]),
           "bytes": 3 * manifest["height"] * manifest["width"] / compression, "compression": compression} | metrics
    for name in ("top1", "top1_held_out", "top1_unseen", "i2t_r1", "knn", "linear"):
        if name in row and f"teacher_{name}" in row:
            row[f"{name}_ratio"] = row[name] / max(row[f"teacher_{name}"], 1e-12)
    return row


def vl_table(rows: list[dict]) -> str:
    """The Markdown table of the rows (percentages; "-" where a measure does not apply)."""
    def pct(row, key):
        return f"{100 * row[key]:.1f}" if key in row else "-"

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    header = ["Gaussians", "k", "mean count", "pruned", "PSNR (dB)", "bytes", "compression", "cosine",
              "zero-shot % (teacher)", "ratio", "held-out % (teacher)", "unseen classes % (teacher)",
              "seen classes % (teacher)", "i2t R@1/5/10 %",
              "teacher i2t R@1/5/10 %", "kNN % (teacher)", "linear % (teacher)"]
    lines = []
    for r in rows:
        lines.append([Path(r["gaussians"]).name, r["k"], f"{r['mean_count']:.1f}", "yes" if r["pruned"] else "no",
                      f"{r['psnr']:.2f}", f"{r['bytes']:.0f}", f"{r['compression']:.2f}x", f"{r['cosine']:.3f}",
                      f"{pct(r, 'top1')} ({pct(r, 'teacher_top1')})", ratio(r, "top1_ratio"),
                      f"{pct(r, 'top1_held_out')} ({pct(r, 'teacher_top1_held_out')})",
                      f"{pct(r, 'top1_unseen')} ({pct(r, 'teacher_top1_unseen')})",
                      f"{pct(r, 'top1_seen')} ({pct(r, 'teacher_top1_seen')})",
                      "/".join(pct(r, f"i2t_r{k}") for k in (1, 5, 10)),
                      "/".join(pct(r, f"teacher_i2t_r{k}") for k in (1, 5, 10)),
                      f"{pct(r, 'knn')} ({pct(r, 'teacher_knn')})", f"{pct(r, 'linear')} ({pct(r, 'teacher_linear')})"])
    checkpoints = sorted({r["checkpoint"] for r in rows})
    return ("# Gaussian vision-language evaluation\n\nCheckpoints: " + ", ".join(checkpoints)
            + ". Figures in parentheses: the RGB teacher on the same images.\n\n" + markdown_table(header, lines))


def _plot(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if "top1_ratio" in r]
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for pruned in (False, True):
        part = sorted((r for r in rows if r["pruned"] == pruned), key=lambda r: r["compression"])
        if part:
            ax.plot([r["compression"] for r in part], [r["top1_ratio"] for r in part], "o-",
                    label="pruned" if pruned else "not pruned")
            for r in part:
                ax.annotate(f"k={r['k']}", (r["compression"], r["top1_ratio"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("compression vs 8-bit pixels (x)")
    ax.set_ylabel("zero-shot top-1 / RGB teacher's")
    ax.legend()
    save_figure(path, fig)
