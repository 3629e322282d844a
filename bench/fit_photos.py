"""Photos through ``gvit fit``: PSNR against seconds per photo, this checkout beside an older one.

Each row is the command a user runs, ``gvit fit FOLDER --num-gaussians K`` with its defaults (plus
any ``--flags`` given for that row), measured through the command: its wall-clock time divided by
the photos (reading, fitting, writing the Gaussian files and pictures, the numba start-up included)
and the PSNR of every photo from its ``metrics.csv``. The older code runs from a git worktree
(``--old-tree``, e.g. ``git worktree add /tmp/gvit-old 3901381``) in the same run, by putting it
first on ``PYTHONPATH``. One command runs at a time; nothing else should run beside it.

    python bench/fit_photos.py --old-tree /tmp/gvit-old --folders mcmaster18 --ks 9000
    python bench/fit_photos.py --folders cbsd68 --ks 2000 9000 30000 --skip 3 --limit 8
    python bench/fit_photos.py --folders mcmaster18 --ks 9000 --rows new "new:--grow-from 1" \\
        "new:--target-psnr 32 --grow-rounds 8"
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GVIT_DATA", HERE / ".." / "shared" / "data"))


def run_fit(tree: Path, photos: list[Path], k: int, flags: list[str], out: Path) -> tuple[float, list[dict]]:
    """Seconds of one ``gvit fit`` command over ``photos`` (linked into one folder) and its metrics rows."""
    src = out.parent / (out.name + "-in")
    src.mkdir()
    for p in photos:
        (src / p.name).symlink_to(p.resolve())
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "gvit.cli", "fit", str(src), "--out", str(out), "--num-gaussians", str(k),
           "--quiet", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    with open(out / "metrics.csv", newline="") as f:
        return seconds, list(csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", nargs="+", default=["mcmaster18", "cbsd68"], help="folders under photos/")
    p.add_argument("--ks", type=int, nargs="+", default=[2000, 9000, 30000])
    p.add_argument("--limit", type=int, default=None, help="N photos of each folder, in name order")
    p.add_argument("--skip", type=int, default=0, help="start after the first N photos (e.g. those a recipe was "
                                                       "chosen on)")
    p.add_argument("--old-tree", type=Path, default=None, help="a worktree of the code to compare with")
    p.add_argument("--rows", nargs="+", default=None,
                   help="rows as CODE[:FLAGS], CODE = new or old (default: old, then new)")
    a = p.parse_args()
    rows = a.rows or (["old", "new"] if a.old_tree else ["new"])
    trees = {"new": HERE, "old": a.old_tree}
    print(f"{sys.executable}, {os.cpu_count()} CPUs; old tree: {a.old_tree}", flush=True)
    table = []
    with tempfile.TemporaryDirectory(prefix="gvit-fit-photos-") as tmp:
        first = sorted(f for f in (DATA / "photos" / a.folders[0]).iterdir() if f.is_file())[:1]
        for code in sorted({row.partition(":")[0] for row in rows}):  # compile (or load) each tree's kernels
            if trees.get(code) is not None:
                run_fit(trees[code], first, 16, ["--iters", "2"], Path(tmp) / f"warm-{code}")
        for folder in a.folders:
            photos = sorted(f for f in (DATA / "photos" / folder).iterdir() if f.is_file())[a.skip:]
            photos = photos[:a.limit]
            for k in a.ks:
                base = None
                for n, row in enumerate(rows):
                    code, _, flags = row.partition(":")
                    if trees.get(code) is None:
                        raise SystemExit(f"row {row!r}: no tree for {code!r} (give --old-tree)")
                    seconds, metrics = run_fit(trees[code], photos, k, shlex.split(flags),
                                               Path(tmp) / f"{folder}-{k}-{n}")
                    psnr = {m["name"]: float(m["psnr"]) for m in metrics}
                    by_name = {m["name"]: int(m["count"]) for m in metrics}
                    counts = list(by_name.values())
                    entry = dict(folder=folder, k=k, row=row, psnr=psnr, seconds=seconds / len(photos),
                                 count=statistics.mean(counts), count_min=min(counts), count_max=max(counts),
                                 counts=by_name)
                    base = base or entry
                    entry["gain"] = statistics.median(psnr[name] - base["psnr"][name] for name in psnr)
                    entry["time"] = entry["seconds"] / base["seconds"]
                    table.append(entry)
                    print(f"{folder} k={k} {row}: median {statistics.median(psnr.values()):.2f} dB, "
                          f"{entry['seconds']:.1f} s/photo, count {entry['count']:.0f}", flush=True)
    print("\n| photos | k | code and flags | median PSNR (dB) | mean PSNR (dB) | vs first row (median of "
          "differences, dB) | seconds per photo | time vs first row | Gaussians kept (mean, min-max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in table:
        values = list(e["psnr"].values())
        print(f"| {e['folder']} ({len(values)}) | {e['k']:,} | `{e['row']}` | {statistics.median(values):.2f} | "
              f"{statistics.mean(values):.2f} | {e['gain']:+.2f} | {e['seconds']:.1f} | {e['time']:.2f}x | "
              f"{e['count']:,.0f} ({e['count_min']:,}-{e['count_max']:,}) |")
    print("\nPer photo: PSNR (dB) / Gaussians kept, one column per row above\n")
    print("| photos | k | photo | " + " | ".join(f"`{r}`" for r in rows) + " |")
    print("|---|---|---|" + "---|" * len(rows))
    for start in range(0, len(table), len(rows)):
        group = table[start:start + len(rows)]
        for name in sorted(group[0]["psnr"]):
            print(f"| {group[0]['folder']} | {group[0]['k']:,} | {name} | "
                  + " | ".join(f"{e['psnr'][name]:.2f} / {e['counts'][name]:,}" for e in group) + " |")


if __name__ == "__main__":
    main()
