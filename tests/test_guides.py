"""Every guide's commands run, in order, at a tiny size on generated data, so a guide cannot drift from the
CLI; and the README's and the guides' links point at files and headings that exist.

Each command of a guide's ``bash`` blocks (``gvit ...`` in this process, ``torchrun ...`` in a child) runs
as written, with only its size turned down: fewer steps, Gaussians, iterations and images (:func:`tiny`),
the shared CIFAR-10 path replaced by a generated folder. Commands that need CUDA or a user's own data
(``/path/to/...``, the mini-ImageNet config) are the only ones left out."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gvit.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
TRAIN_TINY = ["steps=2", "batch_size=8", "limit_train=16", "limit_eval=8", "checkpoint_every=1", "log_every=1",
              "num_workers=0"]


def commands(guide: Path) -> list[str]:
    """The ``gvit`` and ``torchrun`` commands of a guide's bash blocks, continuation lines joined, comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", guide.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("gvit ", "torchrun ")):
                out.append(line)
    return out


def _set(args: list[str], flag: str, value: str) -> list[str]:
    if flag in args:
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def tiny(argv: list[str]) -> list[str]:
    """The same command at a tiny size."""
    argv = [a.replace("../shared/data/cifar10", "mydata") for a in argv]
    command = argv[0]
    if command == "fit":
        argv = _set(argv, "--num-gaussians", "8")  # a dataset's k stays: models read it
    if command in ("fit", "fit-dataset"):
        argv = _set(argv, "--iters", "3")
    if command == "fit-dataset":
        argv = _set(argv, "--limit", "96")
    if command in ("train", "sweep", "leakage"):
        argv = [a for a in argv if not a.startswith("steps=")] + TRAIN_TINY
    if command == "interpret":
        argv = _set(argv, "--limit", "8")
    if command == "tokens" and argv[1] == "encode":
        argv = [*argv, "limit_eval=8"]
    return argv


def run(line: str) -> None:
    argv = shlex.split(line)
    if argv[0] == "torchrun":
        at = argv.index("gvit.cli")
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:at - 1], "-m", "gvit.cli", *tiny(argv[at + 1:])]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        return
    argv = tiny(argv[1:])
    assert main([*argv, "--quiet"] if argv[0] in QUIET else argv) == 0, line


QUIET = {"fit", "encode", "decode", "fit-dataset", "train", "explain", "interpret", "leakage", "vl-eval", "tokens"}


def _shapes_folder(root: Path, split: str, per_class: int, seed: int) -> None:
    from gvit.data import SHAPE_CLASSES, make_shapes

    images, labels, _ = make_shapes(per_class * len(SHAPE_CLASSES), 16, seed=seed)
    counts: dict[int, int] = {}
    for image, label in zip(images, labels.tolist()):
        counts[label] = counts.get(label, 0) + 1
        folder = root / split / SHAPE_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{counts[label]}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with photos/, cat.png, mydata/{train,test}/<class>/ and the repository's configs."""
    root = tmp_path_factory.mktemp("guides")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(2):
        yy, xx = np.mgrid[0:20, 0:28]
        pixels = np.stack([xx * 9, yy * 12, (xx + yy) * 5], -1) + rng.integers(0, 30, (20, 28, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "photos" / f"p{i}.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "cat.png")
    _shapes_folder(root / "mydata", "train", 32, seed=1)
    _shapes_folder(root / "mydata", "test", 4, seed=2)
    (root / "configs").symlink_to(ROOT / "configs")
    return root


# commands a guide relies on from before it (a checkpoint, fitted folders), run first
SETUP = {
    "train.md": ["gvit fit-dataset --data mydata --split train --out gs/train --num-gaussians 64",
                 "gvit fit-dataset --data mydata --split test --out gs/test --num-gaussians 64"],
    "tools.md": ["gvit train --config configs/cifar10_cpu.yaml data=mydata out=runs/c10"],
}
SKIPPED = ("cuda", "/path/to", "mini_imagenet")  # a GPU, or the user's own data (that config's data is a path to set)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_each_guides_commands_run(guide, workspace, monkeypatch, tmp_path):
    lines = commands(guide)
    if guide.name == "file-formats.md":
        assert lines == []  # a reference page: nothing to run
        return
    assert lines, f"{guide.name} shows no commands"
    work = tmp_path / "work"
    work.mkdir()
    for item in workspace.iterdir():
        (work / item.name).symlink_to(item)
    monkeypatch.chdir(work)
    for line in SETUP.get(guide.name, []) + [c for c in lines if not any(s in c for s in SKIPPED)]:
        run(line)


def _anchors(path: Path) -> set[str]:
    from pymdownx.slugs import slugify

    slug = slugify(case="lower")
    return {slug(h.strip(), "-") for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_readme_and_guide_links_point_at_files_and_headings_that_exist():
    pages = [ROOT / "README.md", *GUIDES, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
