"""The validation split: carved from the training images (every n-th image of each class) for every
kind of dataset, disjoint from train and test, deterministic, of the expected size; a folder's own
val/ is used as it is; training reports the val measures beside the evaluation split's."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from gvit.data import open_dataset
from gvit.data.base import dataset_labels

from test_cifar import make_cifar10


def _images(ds) -> list[bytes]:
    return [ds[i][0].numpy().tobytes() for i in range(len(ds))]


def _check_carve(path, every: int, **kw):
    """train / val / test of ``path``: disjoint, train + val = the whole training split, val every
    ``every``-th image of each class, and the same on a second open."""
    full = open_dataset(path, "train", **kw)
    train, val = open_dataset(path, "train", val_every=every, **kw), open_dataset(path, "val", val_every=every, **kw)
    test = open_dataset(path, "test", val_every=every, **kw)
    a, b, c, whole = map(_images, (train, val, test, full))
    assert not set(a) & set(b) and not set(b) & set(c) and not set(a) & set(c)
    assert sorted(a + b) == sorted(whole)
    counts = torch.bincount(dataset_labels(full))
    assert len(val) == int((counts // every).sum()) and len(train) == len(full) - len(val)
    assert _images(open_dataset(path, "val", val_every=every, **kw)) == b  # deterministic
    assert torch.equal(dataset_labels(val), torch.as_tensor([val[i][1] for i in range(len(val))]))
    return train, val


def test_shapes_and_captioned_shapes_carve_val_from_train():
    _, val = _check_carve("shapes:120", 5)
    assert val.masks.shape == (len(val), 32, 32)  # per-item fields go along
    _, val = _check_carve("captioned-shapes:120", 4)
    assert len(val.captions) == len(val) == len(val.held_out)
    full = open_dataset("captioned-shapes:120")
    where = {image: i for i, image in enumerate(_images(full))}
    assert [full.captions[where[image]] for image in _images(val)] == val.captions  # each caption with its image


def test_cifar_batches_carve_val_from_train(tmp_path):
    _check_carve(make_cifar10(tmp_path / "c"), 3)


def _tree(root, classes=3, per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i:02d}.png")
    return root


def test_folders_carve_val_from_train_or_use_their_own(tmp_path):
    _check_carve(_tree(tmp_path / "one"), 4)  # one tree: test held out, then val carved from the rest
    split = tmp_path / "split"
    _tree(split / "train", seed=1)
    _tree(split / "test", per_class=3, seed=2)
    _check_carve(split, 3)
    _tree(split / "val", per_class=2, seed=3)  # a val/ of its own is used, and train stays whole
    assert len(open_dataset(split, "val")) == 6 and len(open_dataset(split, "train", val_every=3)) == 36


def test_no_val_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no validation split.*val_every"):
        open_dataset("shapes", "val")
    with pytest.raises(ValueError, match="val_every"):
        open_dataset("shapes", "val", val_every=-1)
    from gvit.cli import main

    assert main(["train", "data=shapes:64", "eval_split=val", "steps=1", f"out={tmp_path / 'r'}", "--quiet"]) == 2


def test_a_run_trains_without_its_val_images_and_reports_them(tmp_path):
    from gvit.train import make_config, train
    from gvit.train.data import image_datasets

    cfg = make_config(model="patch_vit", data="shapes:96", limit_eval=24, image_size=16, steps=2, batch_size=8,
                      classifier_size="micro", val_every=4, out=str(tmp_path / "pv"))
    train_ds, _ = image_datasets(cfg)
    assert len(train_ds) == 96 - len(open_dataset("shapes:96", "val", val_every=4))
    result = train(cfg, progress=False)
    assert result["eval_split"] == "test" and 0 <= result["val_top1"] <= 1 and result["val_eval_images"] > 0
    # the same measures on as many training images, and the loss beside top-1 on each split
    assert result["train_eval_images"] == result["eval_images"] == 24 and 0 <= result["train_top1"] <= 1
    assert result["train_loss"] > 0 and result["loss"] > 0 and result["val_loss"] > 0


def test_eval_every_logs_train_and_val_curves_and_the_report_draws_them(tmp_path):
    import json

    from gvit.cli import main
    from gvit.train import make_config, train

    cfg = make_config(model="patch_vit", data="shapes:96", limit_eval=16, image_size=16, steps=4, batch_size=8,
                      classifier_size="micro", val_every=4, eval_every=2, out=str(tmp_path / "pv"))
    train(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "pv" / "metrics.jsonl").read_text().splitlines()]
    curves = [m for m in lines if "val_top1" in m]
    assert [m["step"] for m in curves] == [2, 4] and all(0 <= m["train_top1"] <= 1 and m["val_loss"] > 0
                                                         for m in curves)
    assert main(["report", "--checkpoint", str(tmp_path / "pv" / "checkpoint.pt"), "--out", str(tmp_path / "r"),
                 "--examples", "1"]) == 0
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="eval_every"):
        make_config(model="patch_vit", data="shapes:96", eval_every=2)


def test_shapes_are_generated_once_per_process_and_equal_make_shapes():
    from gvit.data import make_shapes

    first, again = open_dataset("shapes:40"), open_dataset("shapes:40", "val", val_every=4)
    images, labels, masks = make_shapes(40, 32, seed=0)
    assert torch.equal(first.images, images) and torch.equal(first.targets, labels) and torch.equal(first.masks, masks)
    assert open_dataset("shapes:40").images is first.images  # the same tensors, not generated again
    assert 0 < len(again) < 40 and not torch.equal(open_dataset("shapes:40", "test").images[:10], images[:10])


@pytest.fixture(scope="module")
def gaussian_folders(tmp_path_factory):
    """A Gaussian folder of the whole shapes:48 train split and one of its test split."""
    from gvit.fit import FitConfig
    from gvit.tools.fit_dataset import fit_dataset

    root = tmp_path_factory.mktemp("folders")
    quiet = dict(progress=False, log=lambda *_: None)
    for split in ("train", "test"):
        fit_dataset("shapes:48", root / split, FitConfig(num_gaussians=8, iters=2), split=split, **quiet)
    fit_dataset("shapes:48", root / "carved", FitConfig(num_gaussians=8, iters=2), split="train", val_every=4,
                **quiet)
    return root


def _offline(root, tmp_path, **kw):
    from gvit.train import make_config

    return make_config(model="offline", offline_train=str(root / "train"), offline_eval=str(root / "test"),
                       classifier_size="micro", num_gaussians=8, steps=2, batch_size=8, out=str(tmp_path / "run"), **kw)


def test_a_gaussian_folder_run_carves_its_val_split_from_offline_train(gaussian_folders, tmp_path):
    from gvit.train.data import shard_datasets

    train_ds, val_ds = shard_datasets(_offline(gaussian_folders, tmp_path, val_every=4, eval_split="val"))
    # the same images as the image dataset's val split, and none of them left in training
    assert val_ds.split == "val" and sorted(val_ds.indices) == _carved_indices("shapes:48", 4)
    assert len(val_ds) == len(open_dataset("shapes:48", "val", val_every=4))
    assert not set(val_ds.indices) & set(train_ds.indices) and len(train_ds) + len(val_ds) == 48
    _, test_ds = shard_datasets(_offline(gaussian_folders, tmp_path, val_every=4))
    assert test_ds.split == "test" and len(test_ds) == 48
    train_only, _ = shard_datasets(_offline(gaussian_folders, tmp_path, val_every=4))
    assert train_only.indices == train_ds.indices  # val_every leaves the val images out of training


def _carved_indices(path, every):
    from gvit.data.datasets import every_nth_of_each_class

    labels = dataset_labels(open_dataset(path, "train")).tolist()
    return [i for i, v in enumerate(every_nth_of_each_class(labels, every)) if v]


def test_a_run_on_gaussian_folders_reports_val_from_val_images(gaussian_folders, tmp_path):
    from gvit.train import train, val_top1

    result = train(_offline(gaussian_folders, tmp_path, val_every=4), progress=False)
    assert result["eval_split"] == "test" and result["val_eval_split"] == "val"
    assert result["val_eval_images"] == len(_carved_indices("shapes:48", 4)) and val_top1(result) == result["val_top1"]


def test_eval_split_val_without_val_images_is_a_clear_error(gaussian_folders, tmp_path):
    from gvit.train.data import shard_datasets

    with pytest.raises(ValueError, match="eval_split=val.*val_every"):
        shard_datasets(_offline(gaussian_folders, tmp_path, eval_split="val"))
    carved = _offline(gaussian_folders, tmp_path, eval_split="val", val_every=4)
    with pytest.raises(ValueError, match="val_every 4"):  # already carved when fitted: a val folder is needed
        shard_datasets(replace(carved, offline_train=str(gaussian_folders / "carved")))


def test_choosers_refuse_a_figure_not_measured_on_val(monkeypatch):
    import importlib.util
    from pathlib import Path

    from gvit.tools.sweep import chosen_on_val
    from gvit.train import val_top1

    test_as_val = {"top1": 0.9, "eval_split": "test", "val_top1": 0.8, "val_eval_split": "test"}
    assert val_top1(test_as_val) is None and val_top1({"top1": 0.7, "eval_split": "val"}) == 0.7
    assert val_top1({"top1": 0.9, "eval_split": "test", "val_top1": 0.6, "val_eval_split": "val"}) == 0.6
    path = Path(__file__).resolve().parents[1] / "bench" / "trials.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_trials_refusal", path)
    trials = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trials)
    with pytest.raises(SystemExit, match="refusing a figure evaluated on 'test'"):
        trials.chosen_on(test_as_val)
    assert chosen_on_val([{"variant": "a", "val_top1": val_top1(test_as_val), "top1": 0.9}]) is None
