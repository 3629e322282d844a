"""Output folders that protect their inputs and runs (gvit.files.output_folder), driven through the
real CLI: each bad case exits 2 with one line naming the culprit, leaves the inputs unchanged and
writes nothing; reruns keep finished work and redo what is missing or invalid."""

import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import torch
import pytest
from PIL import Image

from gvit.cli import main
from gvit.files import LOCK, MARKER, output_folder

QUICK = ["--num-gaussians", "8", "--iters", "5", "--quiet"]
TRAIN = ["data=shapes:48", "limit_eval=16", "steps=2", "batch_size=8", "encoder_size=micro", "classifier_size=micro",
         "image_size=16", "patch=4", "num_gaussians=8", "log_every=1"]


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys, *names):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gvit "), err  # one line, no traceback
    for name in names:
        assert str(name) in err, err
    return err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_fit_refuses_an_out_folder_in_its_inputs(tmp_path, capsys, where):
    photos = _images(tmp_path / "photos")
    before = _digest(photos)
    out = photos if where == "same" else photos / "fitted"
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 2
    err = _error(capsys, photos)
    assert ("is the input" if where == "same" else "lies inside the input") in err
    assert _digest(photos) == before and not (photos / "fitted").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", *TRAIN, f"out={out}", "--quiet"]) == 0
    return out / "checkpoint.pt"


def test_explain_and_report_refuse_to_write_over_their_inputs(tmp_path, capsys, checkpoint):
    photos = _images(tmp_path / "photos")
    before, run = _digest(photos), _digest(checkpoint.parent)
    assert main(["explain", str(photos), "--checkpoint", str(checkpoint), "--out", str(photos), "--quiet"]) == 2
    _error(capsys, photos, "is the input")
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(checkpoint.parent)]) == 2
    _error(capsys, checkpoint.parent, "holds the input")
    assert _digest(photos) == before and _digest(checkpoint.parent) == run
    assert (
        main(["explain", str(photos), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ex"), "--quiet"]) == 0
    )


def test_an_out_that_is_a_file_or_holds_foreign_files_is_refused(tmp_path, capsys):
    photos = _images(tmp_path / "photos")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["fit", str(photos), "--out", str(target), *QUICK]) == 2
    _error(capsys, target, "not a folder")
    assert main(["fit", str(photos), "--out", str(target / "sub"), *QUICK]) == 2
    _error(capsys, target / "sub", "cannot create the folder")
    foreign = tmp_path / "mixed"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert main(["fit", str(photos), "--out", str(foreign), *QUICK]) == 2
    _error(capsys, foreign, "thesis.tex", "--overwrite")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    assert main(["fit", str(photos), "--out", str(foreign), "--overwrite", *QUICK]) == 0
    assert (foreign / "thesis.tex").read_text() == "keep me" and (foreign / "im0.gaussians.safetensors").is_file()


def test_another_jobs_folder_is_refused(tmp_path, capsys):
    photos = _images(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 0
    before = _digest(out)
    assert main(["train", *TRAIN, f"out={out}", "--quiet"]) == 2
    _error(capsys, out, "gvit fit")
    assert _digest(out) == before


def test_train_refuses_a_folder_holding_a_run_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TRAIN, f"out={out}", "--quiet"]) == 0  # key=value after a flag is accepted
    capsys.readouterr()
    finished = _digest(out)
    assert main(["train", *TRAIN, f"out={out}", "--quiet"]) == 2
    _error(capsys, out, "--resume", "--overwrite")
    assert main(["train", *TRAIN, "steps=3", f"out={out}", "--resume", "--quiet"]) == 2
    _error(capsys, out, "other settings", "steps")
    assert _digest(out) == finished
    assert main(["train", *TRAIN, "steps=3", f"out={out}", "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "result.json").read_text())["step"] == 3


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    photos = _images(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"job": "fit", "pid": holder.pid, "host": os.uname().nodename}))
        assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 2
        _error(capsys, out, f"pid {holder.pid}", "gvit fit")
    finally:
        holder.kill()
        holder.wait()
    (out / ".im0.gaussians.safetensors.x1y2.tmp").write_bytes(b"half")  # a killed run's temporary file
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 0  # the dead holder's lock is taken over
    assert not (out / LOCK).exists() and not list(out.glob(".*.tmp"))
    assert json.loads((out / MARKER).read_text())["job"] == "fit"


def test_fit_redoes_images_without_a_metrics_row_or_with_an_invalid_file(tmp_path, capsys):
    photos = _images(tmp_path / "photos", n=3)
    out = tmp_path / "out"
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] != "im0"]  # killed before its row was written
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "im1.gaussians.safetensors").write_bytes(b"corrupt")
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 0
    assert "fitted 2 image(s)" in capsys.readouterr().out
    with open(out / "metrics.csv", newline="") as f:
        assert sorted(r["name"] for r in csv.DictReader(f)) == ["im0", "im1", "im2"]


def test_a_failed_claim_or_an_early_error_writes_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with output_folder(out, "fit"):
            raise RuntimeError("failed before writing anything")
    assert not out.exists()
    with output_folder(out, "fit") as folder:  # nested claim by the holder: no second lock, no new marker
        with output_folder(folder, "report"):
            pass
        assert json.loads((folder / MARKER).read_text())["job"] == "fit"


def test_a_folder_without_a_split_is_evaluated_on_held_out_images(tmp_path, capsys):
    from gvit.data import open_dataset

    tree = tmp_path / "tree"
    for c in ("cats", "dogs"):
        _images(tree / c, n=12)
    train_part, test_part = open_dataset(tree, "train"), open_dataset(tree, "test")
    train_files = {train_part.dataset.samples[i][0] for i in train_part.indices}
    test_files = {test_part.dataset.samples[i][0] for i in test_part.indices}
    assert len(train_files) == 22 and len(test_files) == 2 and not train_files & test_files
    assert test_part.classes == ["cats", "dogs"] and "held out" in test_part.split_note
    out = tmp_path / "run"
    assert main(["train", f"data={tree}", *TRAIN[1:], "batch_size=4", f"out={out}", "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["eval_images"] == 2 and "held out" in result["split_note"]


def test_arguments_are_checked_for_sense_before_any_work(tmp_path, capsys):
    photos = _images(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["fit", str(photos), "--out", str(out), "--num-gaussians", "1000000000", "--quiet"]) == 2
    _error(capsys, "num_gaussians=1000000000", "GiB")
    assert not out.exists()
    assert main(["fit-dataset", "--data", "shapes:32", "--out", str(out), "--limit", "-5", "--quiet"]) == 2
    _error(capsys, "--limit", "-5")
    assert not out.exists()


@pytest.mark.parametrize("field,value,message", [
    ("opacities", lambda t: t.to(torch.int32), "opacities must be floating point"),
    ("means", lambda t: t > 0, "means must be floating point"),
    ("colors", lambda t: t * 1e6, "colours must lie in [0, 1]"),
    ("labels", lambda t: t.float(), "labels must be integers"),
])
def test_gaussian_files_with_wrong_types_or_ranges_are_refused(tmp_path, field, value, message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from gvit.gaussians import decode, load_gaussians, sample_initial, save_gaussians

    path = tmp_path / "g.safetensors"
    save_gaussians(path, decode(sample_initial(2, 5)), labels=torch.tensor([0, 1]))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[field] = value(tensors[field]).contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"g.safetensors: .*{message[:20]}"):
        load_gaussians(path)


def test_a_decompression_bomb_is_named_and_skipped_without_losing_the_good_files(tmp_path, capsys):
    import struct
    import zlib

    photos = _images(tmp_path / "photos")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # claims 60000 x 60000 RGB
    (photos / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    out = tmp_path / "out"
    assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 2
    _error(capsys, "bomb.png")
    assert not out.exists()
    assert main(["fit", str(photos), "--out", str(out), "--skip-bad", *QUICK]) == 0
    assert "bomb.png" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.gaussians.safetensors")) == ["im0.gaussians.safetensors",
                                                                         "im1.gaussians.safetensors"]


def test_fit_dataset_skips_a_shard_whose_images_are_all_unreadable_and_a_rerun_finishes(tmp_path, capsys):
    from gvit.data.shards import load_shards

    tree = tmp_path / "tree"
    _images(tree / "b", n=10)
    (tree / "a").mkdir()
    for i in range(10):
        (tree / "a" / f"x{i}.png").write_bytes(b"not an image")
    out = tmp_path / "gs"
    args = ["fit-dataset", "--data", str(tree), "--out", str(out), "--shard-size", "9", *QUICK]
    assert main(args) == 2
    _error(capsys, "x0.png")
    assert main(args + ["--skip-bad"]) == 0
    assert main(args + ["--skip-bad"]) == 0  # a rerun finds every shard done
    g, labels, indices, manifest = load_shards(out)
    assert len(labels) == 9 and set(labels.tolist()) == {1} and len(manifest["skipped"]) == 9


def test_fit_dataset_redoes_a_corrupt_shard(tmp_path, capsys):
    from gvit.data.shards import load_shards, shard_name

    out = tmp_path / "gs"
    args = ["fit-dataset", "--data", "shapes:24", "--out", str(out), "--shard-size", "8", *QUICK]
    assert main(args) == 0
    good = load_shards(out)[1]
    (out / shard_name(1)).write_bytes(b"torn")
    assert main(args) == 0
    assert (load_shards(out)[1] == good).all()


def test_settings_that_cannot_work_are_named(tmp_path, capsys, checkpoint):
    photos = _images(tmp_path / "photos")
    assert main(["fit", str(photos), "--out", str(tmp_path / "o"), "--lr-scale", "1e30", *QUICK]) == 2
    _error(capsys, "lr_scale", "1e+30")
    assert not (tmp_path / "o").exists()
    assert main(["eval", "--checkpoint", str(checkpoint), "classifier_size=tiny"]) == 2
    _error(capsys, "classifier_size changes the model", checkpoint)
    assert main(["eval", "--checkpoint", str(checkpoint), "limit_eval=8"]) == 0


def test_outputs_get_the_usual_permissions_and_a_checkpoint_from_another_version_is_named(tmp_path, capsys,
                                                                                          checkpoint):
    import torch as _torch

    photos = _images(tmp_path / "photos")
    out = tmp_path / "o"
    old = os.umask(0o022)
    try:
        assert main(["fit", str(photos), "--out", str(out), *QUICK]) == 0
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir() if p.is_file())
    state = _torch.load(checkpoint, weights_only=True)
    state["config"]["a_key_from_the_future"] = 1
    newer = tmp_path / "newer.pt"
    _torch.save(state, newer)
    assert main(["eval", "--checkpoint", str(newer)]) == 2
    _error(capsys, "newer.pt", "a_key_from_the_future")


def test_a_demo_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, monkeypatch):
    import gvit.train.loop as loop
    from gvit.tools.demo import run_demo

    out = tmp_path / "demo"
    overrides = ["data=shapes:64", "val_every=4", "limit_eval=16", "steps=4", "image_size=16", "num_gaussians=8",
                 "batch_size=8"]
    real = loop._train

    def killed(cfg, **kw):  # a run that wrote its first metric lines and was killed before a checkpoint
        (tmp_path / "demo" / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, overrides, baseline=False, progress=False, log=lambda *a: None)
    monkeypatch.setattr(loop, "_train", real)
    assert not (out / "run" / "checkpoint.pt").exists() and (out / "run" / MARKER).is_file()
    summary = run_demo(out, overrides, resume=True, baseline=False, progress=False, log=lambda *a: None)
    assert summary["top1"] >= 0 and (out / "run" / "result.json").is_file()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KB tmpfs (root only; skipped where mounting is not allowed), grown to 16 MB by ``grow()``."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the monkeypatched fault tests cover the same paths")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_fit_is_one_line_and_a_rerun_finishes(tmp_path, tiny_disk, capsys):
    mount, grow = tiny_disk
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    out = mount / "fitted"
    args = ["fit", str(photos), "--out", str(out), "--num-gaussians", "64", "--iters", "5", "--batch-size", "1",
            "--quiet"]
    assert main(args) == 2
    err = _error(capsys, "no space left", str(out))
    assert "rerun" in err
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:  # what finished is listed and whole
        done = [row["name"] for row in csv.DictReader(f)]
    from gvit.gaussians import load_gaussians

    for name in done:
        load_gaussians(out / f"{name}.gaussians.safetensors")
    assert len(done) < 6 and not list(out.glob(".*.tmp"))
    grow()
    assert main(args) == 0 and f"{len(done)} already done" in capsys.readouterr().out


@pytest.mark.parametrize("fault", [28, 13])  # ENOSPC, EACCES
def test_write_faults_of_every_job_are_one_line_naming_the_folder(tmp_path, capsys, monkeypatch, fault):
    import errno

    import gvit.files

    real = os.replace
    state = {"calls": 0}

    def failing_replace(src, dst):  # the first write of a job's outputs after its folder marker fails
        if not str(dst).endswith((MARKER, ".json")) or "result" in str(dst) or "manifest" in str(dst):
            raise OSError(fault, os.strerror(fault))
        state["calls"] += 1
        return real(src, dst)

    photos = _images(tmp_path / "photos")
    what = {errno.ENOSPC: "no space left", errno.EACCES: "permission denied"}[fault]
    monkeypatch.setattr(gvit.files.os, "replace", failing_replace)
    jobs = {"fit": ["fit", str(photos), "--out", str(tmp_path / "f"), *QUICK],
            "encode": ["encode", str(photos), "--out", str(tmp_path / "e"), "--num-gaussians", "8", "--quiet"],
            "fit-dataset": ["fit-dataset", "--data", "shapes:16", "--out", str(tmp_path / "d"), *QUICK],
            "train": ["train", *TRAIN, f"out={tmp_path / 't'}", "--quiet"]}
    for job, args in jobs.items():
        assert main(args) == 2, job
        _error(capsys, what, tmp_path)
    monkeypatch.setattr(gvit.files.os, "replace", real)
    assert main(jobs["encode"]) == 0  # nothing half-written stood in the way
