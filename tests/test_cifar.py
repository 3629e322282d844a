import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from gvit.data import CifarBatches, load_pickle, open_dataset


def _batch(n, seed, label_key=b"labels", classes=10):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", label_key: [int(v) for v in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", _batch(4, i))
    _dump(d / "test_batch", _batch(3, 9))
    _dump(d / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    return d


def test_cifar10_folder_parent_and_tarball_agree(tmp_path):
    d = make_cifar10(tmp_path / "x")
    train = CifarBatches(d, "train")
    assert len(train) == 20 and train.classes[3] == "class3"
    img, label = train[5]
    raw = _batch(4, 2)  # image 5 is the second image of data_batch_2
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert torch.equal((img * 255).round().to(torch.uint8).flatten(), torch.from_numpy(raw[b"data"][1]))
    assert label == raw[b"labels"][1]
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    for source in (tmp_path / "x", tgz):
        other = open_dataset(source, "train")
        assert torch.equal(other.images, train.images) and torch.equal(other.labels, train.labels)
    assert len(open_dataset(tgz, "test")) == 3


def test_cifar100_fine_and_coarse_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        b = _batch(n, n, b"fine_labels", 100)
        b[b"coarse_labels"] = [v % 20 for v in b[b"fine_labels"]]
        _dump(d / split, b)
    _dump(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    fine, coarse = CifarBatches(d, "train"), CifarBatches(d, "train", label="coarse")
    assert len(fine.classes) == 100 and len(coarse.classes) == 20
    assert torch.equal(coarse.labels, fine.labels % 20)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = make_cifar10(tmp_path / "x")
    _dump(d / "data_batch_3", {b"data": _Evil(), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*posix.system|data_batch_3.*os.system"):
        CifarBatches(d, "train")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_pickle(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.", "evil")


def test_truncated_and_malformed_batches_name_the_file(tmp_path):
    d = make_cifar10(tmp_path / "x")
    (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch"):
        CifarBatches(d, "test")
    d = make_cifar10(tmp_path / "y")
    bad = _batch(3, 0)
    bad[b"labels"] = bad[b"labels"][:2]
    _dump(d / "test_batch", bad)
    with pytest.raises(ValueError, match="test_batch.*one label per image"):
        CifarBatches(d, "test")
    bad = _batch(3, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    _dump(d / "test_batch", bad)
    with pytest.raises(ValueError, match=r"test_batch.*\[N, 3072\]"):
        CifarBatches(d, "test")
    (d / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        CifarBatches(d, "train")
    with pytest.raises(ValueError, match="split"):
        CifarBatches(d, "val")


def test_open_dataset_routes(tmp_path):
    shapes = open_dataset("shapes:12", "test")
    assert len(shapes) == 12 and shapes.classes[0] == "circle"
    assert not torch.equal(open_dataset("shapes:12", "train").images, shapes.images)
    with pytest.raises(ValueError, match="shapes:N"):
        open_dataset("shapes:x")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        open_dataset("shapes", "validation")
