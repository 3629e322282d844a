"""Ablation sweeps: one training run per point of a grid of config values (``gvit sweep``).

``run_sweep(config, {"num_gaussians": ["16", "32"], "guidance": ["false", "true"]}, out)`` trains
every combination (the Cartesian product, in grid order) with ``gvit train`` in a child process
(``nproc > 1``: under ``torchrun``), each into ``out/<variant>/``, and after every variant
rewrites ``results.csv``, ``results.md`` and ``results.json`` and one plot per grid key:
``plot_<key>.png``, top-1 against that key's values with one line (numeric values, e.g. the
paper's Fig. 3 with ``num_gaussians`` x ``guidance``) or one bar group (other values, e.g. the
loss choices of Table 1c) per combination of the other keys.

Resuming: a variant whose ``result.json`` exists is not run again; one that has a checkpoint but
no result continues from it (``--resume``). Each variant folder records the full resolved
config in ``variant.json``; rerunning into the same folder with settings that changed for a
finished variant is refused rather than mixing two experiments in one table.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from ..files import check_settings, output_folder, write_json, write_text
from ..train import kind_of, load_config, val_top1
from .artifacts import markdown_table, pyplot, save_figure, write_csv

__all__ = ["parse_grid", "grid_variants", "variant_name", "run_sweep", "plot_sweep", "chosen_on_val"]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["k=v1,v2", ...]`` -> ``{"k": ["v1", "v2"], ...}`` (keys in order; a key given twice is refused)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--grid: expected key=v1,v2,..., got {item!r}")
        if key in grid:
            raise ValueError(f"--grid: key {key!r} is given twice")
        vals = [v.strip() for v in values.split(",")]
        if not all(vals) or len(set(vals)) != len(vals):
            raise ValueError(f"--grid {key}: values must be non-empty and distinct, got {values!r}")
        grid[key] = vals
    if not grid:
        raise ValueError("--grid: give at least one key=v1,v2,...")
    return grid


def grid_variants(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def variant_name(values: dict[str, str]) -> str:
    """Folder name of a variant: ``key-value`` pairs joined by ``__`` (unsafe characters -> ``_``)."""
    return "__".join(f"{_safe(k)}-{_safe(v)}" for k, v in values.items())


def _launch(argv: list[str], nproc: int) -> None:
    """Run ``gvit <argv>`` in a child process (under torchrun when ``nproc > 1``)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gvit.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "gvit.cli", *argv]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise ChildProcessError(f"sweep: `{' '.join(cmd)}` failed with exit status {done.returncode}")


def _variant_arguments(base: list[str], values: dict[str, str], grid: dict[str, list[str]]) -> list[str]:
    """The ``gvit train`` arguments of one variant: the shared overrides and its grid values. A grid
    over ``model`` compares kinds: each variant trains its kind (``--as-model``) and leaves out the
    keys that only the grid's other kinds have."""
    pairs = base + [f"{k}={v}" for k, v in values.items()]
    if "model" not in grid:
        return pairs
    own = set(kind_of(values["model"]).settings.keys()) - {"model"}
    others = {key for model in grid["model"] for key in kind_of(model).settings.keys()}
    keys = [p.partition("=")[0] for p in pairs]
    return [f"--as-model={values['model']}"] + [p for p, k in zip(pairs, keys) if k in own or k not in others]


def _as_model(arguments: list[str]) -> str | None:
    return next((a.partition("=")[2] for a in arguments if a.startswith("--as-model=")), None)


def _settings(arguments: list[str]) -> list[str]:
    return [a for a in arguments if not a.startswith("--")]


def run_sweep(config: str | os.PathLike | None, grid: dict[str, list[str]], out: str | os.PathLike, *,
              overrides: list[str] | None = None, nproc: int = 1, overwrite: bool = False, launch=None,
              log=print) -> list[dict]:
    """Train every variant of ``grid`` on top of ``config`` + ``overrides`` into ``out``; returns
    the result rows (one per finished variant). ``launch(argv, nproc)`` runs one ``gvit`` command
    (the default starts a child process). Every variant's config is checked before the first
    run, so a bad key or value fails at once."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    launch = launch or _launch
    out = Path(out)
    base = list(overrides or [])
    for key in grid:
        if any(o.partition("=")[0] == key for o in base):
            raise ValueError(f"sweep: {key} is both a grid key and an override")
        if key == "out":
            raise ValueError("sweep: out cannot be a grid key (each variant writes into <out>/<variant>)")
    plan = []
    for values in grid_variants(grid):
        name = variant_name(values)
        pairs = _variant_arguments(base, values, grid)
        try:
            cfg = load_config(config, _settings(pairs) + [f"out={out / name}"], as_model=_as_model(pairs))
        except ValueError as exc:
            raise ValueError(f"sweep variant {name}: {exc}") from None
        resolved = {k: v for k, v in cfg.to_dict().items() if k != "out"}
        plan.append((name, values, pairs, resolved))
    for name, _, _, resolved in plan:
        saved = out / name / "variant.json"
        if saved.is_file():
            check_settings(json.loads(saved.read_text())["config"], resolved, out / name,
                           hint="use another --out or remove that folder")
    settings = {"config": None if config is None else str(config), "overrides": base, "grid": grid, "nproc": nproc}
    with output_folder(out, "sweep", settings=settings, continues=True, overwrite=overwrite):
        return _train_variants(config, grid, out, base, plan, nproc, launch, log)


def _train_variants(config, grid, out: Path, base: list[str], plan, nproc: int, launch, log) -> list[dict]:
    write_json(out / "sweep.json", {"config": None if config is None else str(config), "overrides": base,
                                    "grid": grid, "nproc": nproc})
    rows = _rows(out, plan)
    for i, (name, values, pairs, resolved) in enumerate(plan):
        folder = out / name
        if (folder / "result.json").is_file():
            log(f"[{i + 1}/{len(plan)}] {name}: finished before, kept")
            continue
        write_json(folder / "variant.json", {"values": values, "config": resolved})
        resume = (folder / "checkpoint.pt").is_file()
        log(f"[{i + 1}/{len(plan)}] {name}: {'resuming' if resume else 'training'}")
        argv = ["train", *(["--config", str(config)] if config is not None else []), *pairs,
                f"out={folder}", "--quiet", "--resume" if resume else "--overwrite"]  # no checkpoint: nothing to keep
        launch(argv, nproc)
        if not (folder / "result.json").is_file():
            raise ChildProcessError(f"sweep: {name} ended without {folder / 'result.json'} (no evaluation split?)")
        rows = _rows(out, plan)
        write_tables(out, rows, list(grid))
    write_tables(out, rows, list(grid))
    plot_sweep(rows, grid, out)
    return rows


def _rows(out: Path, plan) -> list[dict]:
    rows = []
    for name, values, _, _ in plan:
        path = out / name / "result.json"
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append({"variant": name, **values, "val_top1": val_top1(r), "top1": r.get("top1"),
                         "eval_split": r.get("eval_split"), "psnr": r.get("psnr"),
                         "eval_images": r.get("eval_images"), "train_seconds": r.get("train_seconds"),
                         "bad_steps": r.get("bad_steps")})
    return rows


def chosen_on_val(rows: list[dict]) -> dict | None:
    """The row with the highest validation top-1 (None when no row has one): what a sweep chooses."""
    scored = [r for r in rows if r.get("val_top1") is not None]
    return max(scored, key=lambda r: r["val_top1"]) if scored else None


def write_tables(out: Path, rows: list[dict], keys: list[str]) -> None:
    """``results.csv``, ``results.md`` and ``results.json`` of the finished variants; the table names
    the split of each top-1 and the variant chosen on val (``val_every`` or ``eval_split=val``)."""
    fields = ["variant", *keys, "val_top1", "top1", "eval_split", "psnr", "eval_images", "train_seconds", "bad_steps"]
    write_csv(out / "results.csv", fields, rows)
    best = chosen_on_val(rows)

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    table = [[*(r[k] for k in keys), pct(r["val_top1"]), pct(r["top1"]), r["eval_split"] or "-",
              "-" if r["psnr"] is None else f"{r['psnr']:.1f}", r["eval_images"], f"{r['train_seconds']:.0f}"]
             for r in rows]
    note = ("\n\nChosen on val: " + best["variant"] + f" ({pct(best['val_top1'])}%)." if best else
            "\n\nNo run has a validation split (set val_every, or eval_split=val): nothing is chosen.")
    write_text(out / "results.md", markdown_table([*keys, "val top-1 (%)", "top-1 (%)", "split of top-1", "PSNR (dB)",
                                                   "eval images", "train s"], table) + note)
    write_json(out / "results.json", rows)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot_sweep(rows: list[dict], grid: dict[str, list[str]], out: str | os.PathLike) -> list[Path]:
    """One ``plot_<key>.png`` per grid key with more than one value: top-1 (%) against the key (on val
    when every row has it),
    one series per combination of the other keys. Returns the paths written."""
    plt = pyplot()
    out = Path(out)
    written = []
    measure = "val_top1" if rows and all(r.get("val_top1") is not None for r in rows) else "top1"
    for key, values in grid.items():
        if len(values) < 2 or not rows:
            continue
        others = [k for k in grid if k != key]
        series: dict[tuple, dict[str, float]] = {}
        for r in rows:
            series.setdefault(tuple(r[k] for k in others), {})[r[key]] = 100 * r[measure]
        numeric = all(_number(v) is not None for v in values)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for j, (combo, points) in enumerate(sorted(series.items())):
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or "top-1"
            if numeric:
                xs = sorted((float(v), acc) for v, acc in points.items())
                ax.plot([x for x, _ in xs], [a for _, a in xs], marker="o", label=label)
            else:
                width = 0.8 / len(series)
                pos = [values.index(v) + (j - (len(series) - 1) / 2) * width for v in points]
                ax.bar(pos, list(points.values()), width=width, label=label)
        if numeric:
            nums = [float(v) for v in values]
            if min(nums) > 0 and max(nums) / min(nums) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(nums, values)
        else:
            ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("val top-1 (%)" if measure == "val_top1" else "top-1 (%)")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=8)
        path = out / f"plot_{_safe(key)}.png"
        save_figure(path, fig)
        written.append(path)
    return written
