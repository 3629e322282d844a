"""The validation split: carved from the training images (every n-th image of each class) for every
kind of dataset, disjoint from train and test, deterministic, of the expected size; a folder's own
val/ is used as it is; training reports the val measures beside the evaluation split's."""

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


def test_shapes_are_generated_once_per_process_and_equal_make_shapes():
    from gvit.data import make_shapes

    first, again = open_dataset("shapes:40"), open_dataset("shapes:40", "val", val_every=4)
    images, labels, masks = make_shapes(40, 32, seed=0)
    assert torch.equal(first.images, images) and torch.equal(first.targets, labels) and torch.equal(first.masks, masks)
    assert open_dataset("shapes:40").images is first.images  # the same tensors, not generated again
    assert 0 < len(again) < 40 and not torch.equal(open_dataset("shapes:40", "test").images[:10], images[:10])
