import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gvit.cli import main
from gvit.data.shards import load_shards, shard_name
from gvit.tools.fit_dataset import fit_dataset
from gvit.tools.fit_files import collect_images
from gvit.data import open_dataset
from gvit.fit import FitConfig
from gvit.gaussians import load_gaussians

QUICK = ["--num-gaussians", "16", "--iters", "15", "--quiet"]


def _photo_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA").save(d / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)).save(d / "sub" / "deep.png")
    return d


def test_fit_cli_writes_gaussians_pictures_and_metrics(tmp_path, capsys):
    d = _photo_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["fit", str(d), "--out", str(out), *QUICK]) == 0
    with open(out / "metrics.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["gray", "rgb", "sub/deep", "sub/rgba"]
    for name, row in rows.items():
        g, _, meta = load_gaussians(out / f"{name}.gaussians.safetensors")
        h, w = int(row["height"]), int(row["width"])
        assert g.means.shape == (1, 16, 2) and (int(meta["height"]), int(meta["width"])) == (h, w)
        stored = (out / f"{name}.gaussians.safetensors").stat().st_size  # measured, header included
        assert float(row["psnr"]) > 10 and int(row["count"]) == 16 and int(row["bytes"]) == stored > 16 * 9 * 4
        recon = Image.open(out / f"{name}.recon.png")
        overlay = Image.open(out / f"{name}.overlay.png")
        assert recon.size == (w, h) and max(overlay.size) >= 256
    assert "fitted 4 image(s)" in capsys.readouterr().out
    # a rerun skips what is done
    assert main(["fit", str(d), "--out", str(out), *QUICK]) == 0
    text = capsys.readouterr().out
    assert "fitted 0 image(s)" in text and "4 already done" in text


def test_fit_cli_bad_files(tmp_path, capsys):
    d = _photo_dir(tmp_path)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    assert main(["fit", str(d), "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert main(["fit", str(d), "--out", str(out), "--skip-bad", *QUICK]) == 0
    text = capsys.readouterr().out
    assert "1 unreadable skipped" in text and "broken.jpg" in text
    assert len(list(out.rglob("*.gaussians.safetensors"))) == 4
    assert main(["fit", str(tmp_path / "missing.png"), "--out", str(out), *QUICK]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["fit", str(d), "--out", str(out), "--init", "spiral"]) != 0  # argparse refuses
    assert main(["fit", str(d), "--out", str(out), "--prune-at", "2", "--overwrite", *QUICK]) == 2
    assert "prune_at" in capsys.readouterr().err


def test_collect_images_names_do_not_collide(tmp_path):
    for name in ("a.png", "a.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    names = [n for _, n in collect_images([tmp_path])]
    assert sorted(names) == ["a", "a-2"]


def test_fit_cli_with_pruning_stores_variable_counts(tmp_path):
    d = _photo_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["fit", str(d / "rgb.png"), "--out", str(out), "--num-gaussians", "48", "--iters", "40",
                 "--l1-opacity", "0.02", "--prune-tau", "0.5", "--dtype", "float16", "--quiet"]) == 0
    g, _, _ = load_gaussians(out / "rgb.gaussians.safetensors")
    row = next(csv.DictReader(open(out / "metrics.csv")))
    stored = (out / "rgb.gaussians.safetensors").stat().st_size
    assert g.num_gaussians == int(row["count"]) < 48 and int(row["bytes"]) == stored > g.num_gaussians * 9 * 2


def _check_complete(out, data="shapes:22", split="train"):
    g, labels, indices, manifest = load_shards(out)
    ds = open_dataset(data, split)
    assert indices.tolist() == list(range(len(ds)))  # every image exactly once, in order
    assert torch.equal(labels, ds.labels)
    assert manifest["num_images"] == len(ds) and g.batch_size == len(ds)
    return g, manifest


def test_fit_dataset_shards_and_manifest(tmp_path):
    out = tmp_path / "gs"
    cfg = FitConfig(num_gaussians=16, iters=10)
    manifest = fit_dataset("shapes:22", out, cfg, shard_size=6, batch_size=4, progress=False)
    assert manifest["shards"] == [shard_name(s) for s in range(4)]
    g, _ = _check_complete(out)
    assert g.means.shape == (22, 16, 2) and manifest["classes"][0] == "circle"
    assert manifest["mean_psnr"] > 15
    # a finished folder is left alone, and other settings are refused
    mtimes = [os.stat(out / shard_name(s)).st_mtime_ns for s in range(4)]
    fit_dataset("shapes:22", out, cfg, shard_size=6, batch_size=4, progress=False)
    assert mtimes == [os.stat(out / shard_name(s)).st_mtime_ns for s in range(4)]
    with pytest.raises(ValueError, match="fit differ"):
        fit_dataset("shapes:22", out, FitConfig(num_gaussians=16, iters=11), shard_size=6, progress=False)


def test_fit_dataset_killed_and_restarted_completes_each_image_once(tmp_path):
    out = tmp_path / "gs"
    cmd = [sys.executable, "-m", "gvit.cli", "fit-dataset", "--data", "shapes:22", "--out", str(out),
           "--shard-size", "3", "--batch-size", "3", "--num-gaussians", "16", "--iters", "150", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / shard_name(1)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 2 <= len(done) < 8, done  # killed part-way
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="manifest"):
        load_shards(out)
    for name in done:  # finished shards are whole
        load_gaussians(out / name)
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in done}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert all(os.stat(out / name).st_mtime_ns == t for name, t in mtimes.items())  # not redone
    assert not list(out.glob(".*.tmp"))
    _check_complete(out)


def test_fit_dataset_under_torchrun_splits_the_shards(tmp_path):
    out = tmp_path / "gs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gvit.cli", "fit-dataset", "--data", "shapes:22", "--out", str(out), "--shard-size", "5",
           "--num-gaussians", "16", "--iters", "10", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_complete(out)
    ranks = [int(load_gaussians(out / shard_name(s))[2]["rank"]) for s in range(5)]
    assert ranks == [0, 1, 0, 1, 0]


def test_fit_dataset_cli_errors(tmp_path, capsys):
    assert main(["fit-dataset", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *QUICK]) == 2
    assert "none" in capsys.readouterr().err
    assert main(["fit-dataset", "--data", "shapes:4", "--out", str(tmp_path / "o"), "--shard-size", "0",
                 *QUICK]) == 2
    assert "--shard-size" in capsys.readouterr().err


def test_fit_device_choice(tmp_path, capsys, monkeypatch):
    from gvit.distributed import device_for

    assert device_for("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device: expected auto, cpu or cuda, got 'gpu'"):
        device_for("gpu", "--device")
    if torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert device_for("auto") == torch.device("cuda", 0)
        return
    assert device_for("auto") == torch.device("cpu")
    out = tmp_path / "o"
    for cmd in (["fit-dataset", "--data", "shapes:4"], ["fit", str(_photo_dir(tmp_path))], ["fit-demo"]):
        assert main([*cmd, "--out", str(out), "--device", "cuda", *QUICK]) == 2
        assert "--device=cuda but no CUDA device is available" in capsys.readouterr().err
        assert not out.exists()  # refused before anything is written


def test_fit_dataset_skip_bad_images_in_a_zip(tmp_path):
    import zipfile

    z = tmp_path / "train.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for c in ("a", "b"):
            for i in range(3):
                buf = __import__("io").BytesIO()
                Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(buf, "PNG")
                zf.writestr(f"{c}/{i}.png", buf.getvalue())
        zf.writestr("b/9.png", b"garbage")
    out = tmp_path / "gs"
    with pytest.raises(Exception, match="9.png"):
        fit_dataset(tmp_path, out, FitConfig(num_gaussians=8, iters=5), progress=False)
    manifest = fit_dataset(tmp_path, out, FitConfig(num_gaussians=8, iters=5), skip_bad=True, progress=False)
    assert manifest["num_images"] == 6 and len(manifest["skipped"]) == 1
    assert "9.png" in manifest["skipped"][0]["error"]
    _, labels, indices, _ = load_shards(out)
    assert 6 not in indices.tolist() and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert json.loads((out / "settings.json").read_text())["num_images"] == 7


def test_fit_cli_image_with_good_header_and_corrupt_pixels(tmp_path, capsys):
    d = _photo_dir(tmp_path)
    data = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut
    out = tmp_path / "out"
    assert main(["fit", str(d / "truncated.png"), "--out", str(out), *QUICK]) == 2
    assert "truncated.png" in capsys.readouterr().err
    assert main(["fit", str(d), "--out", str(out), "--skip-bad", *QUICK]) == 0
    assert "truncated.png" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.gaussians.safetensors")) == ["gray.gaussians.safetensors",
                                                                            "rgb.gaussians.safetensors"]


SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not (SHARED_CIFAR / "test.zip").exists(), reason="needs ../shared/data")
def test_fit_dataset_on_the_shared_cifar10_test_split(tmp_path):
    manifest = fit_dataset(SHARED_CIFAR, tmp_path, FitConfig(num_gaussians=32, iters=5), split="test", limit=40,
                           shard_size=16, progress=False)
    g, labels, indices, _ = load_shards(tmp_path)
    # 40 images spread over the class-sorted split: every 250th, four of each class
    assert indices.tolist() == list(range(0, 10000, 250)) and manifest["classes"][0] == "airplane"
    assert torch.equal(labels, open_dataset(SHARED_CIFAR, "test").labels[::250])
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    assert manifest["height"] == manifest["width"] == 32 and g.means.shape == (40, 32, 2)
