import csv
import json

import pytest

from gvit.cli import main
from gvit.data.shards import load_shards
from gvit.tools.fit_dataset import fit_dataset
from gvit.fit import FitConfig
from gvit.tools.leakage import encode_like, run_leakage
from gvit.train import as_kind, make_config, train

K = 8
TINY = dict(data="shapes:64", encoder_size="micro", classifier_size="micro", image_size=16, patch=4, num_gaussians=K,
            batch_size=16, steps=2, log_every=1, checkpoint_every=100)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak")
    fit = FitConfig(num_gaussians=K, iters=5)
    for split in ("train", "test"):
        fit_dataset("shapes:64", root / f"sgd_{split}", fit, split=split, shard_size=24, limit=48 if split == "train"
                    else 32, progress=False)
    train(make_config(**TINY, out=str(root / "gvit")), progress=False)
    return root


def test_encoder_gaussians_cover_the_same_images(setup):
    out = setup / "learned"
    manifest = encode_like(setup / "gvit" / "checkpoint.pt", setup / "sgd_test", out, progress=False)
    g, labels, indices, _ = load_shards(out)
    g_sgd, labels_sgd, indices_sgd, _ = load_shards(setup / "sgd_test")
    assert indices.tolist() == indices_sgd.tolist() and labels.tolist() == labels_sgd.tolist()
    assert g.num_gaussians == K and manifest["num_images"] == 32 and manifest["mean_psnr"] > 5
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    encode_like(setup / "gvit" / "checkpoint.pt", setup / "sgd_test", out, progress=False)  # resumed: nothing redone
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    again, _, _, _ = load_shards(out)
    assert (again.means == g.means).all()


def test_leakage_tables(setup, capsys):
    out = setup / "run"
    args = ["leakage", "--checkpoint", str(setup / "gvit" / "checkpoint.pt"), "--sgd-train", str(setup / "sgd_train"),
            "--sgd-test", str(setup / "sgd_test"), "--out", str(out), "--quiet", "steps=3"]
    assert main(args) == 0
    assert "cross-training top-1" in capsys.readouterr().out
    f = json.loads((out / "leakage.json").read_text())
    values = [f["cross_training"][t][e] for t in ("sgd", "learned") for e in ("sgd", "learned")]
    values += [f["rasterisation"][t][kind] for t in ("sgd", "learned") for kind in ("gaussians", "renders")]
    assert all(0 <= v <= 1 for v in values) and f["steps"] == 3 and f["eval_images"] == 32
    for name in ("gs_sgd", "gs_learned", "img_sgd", "img_learned"):
        assert json.loads((out / name / "result.json").read_text())["step"] == 3
    assert f["rasterisation"]["sgd"]["gaussians"] == f["cross_training"]["sgd"]["sgd"]
    with open(out / "leakage.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["experiment"] for r in rows} == {"cross_training", "rasterisation"}
    md = (out / "leakage.md").read_text()
    assert "Experiment 1" in md and "| trained on SGD Gaussians |" in md
    stamp = (out / "gs_sgd" / "result.json").stat().st_mtime_ns
    run_leakage(setup / "gvit" / "checkpoint.pt", setup / "sgd_train", setup / "sgd_test", out, overrides=["steps=3"],
                progress=False, log=lambda *a: None)
    assert (out / "gs_sgd" / "result.json").stat().st_mtime_ns == stamp  # finished runs are kept


def test_leakage_refuses_mismatched_inputs(setup, tmp_path):
    fit_dataset("shapes:64", tmp_path / "k4", FitConfig(num_gaussians=4, iters=2), split="test", limit=8,
                progress=False)
    with pytest.raises(ValueError, match="k = 4.*k = 8"):
        run_leakage(setup / "gvit" / "checkpoint.pt", tmp_path / "k4", tmp_path / "k4", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="no manifest"):
        run_leakage(setup / "gvit" / "checkpoint.pt", tmp_path / "none", tmp_path / "k4", tmp_path / "o",
                    progress=False)
    train(as_kind(make_config(**TINY), "patch_vit", out=str(tmp_path / "pv")), progress=False)
    with pytest.raises(ValueError, match="model=gvit"):
        run_leakage(tmp_path / "pv" / "checkpoint.pt", setup / "sgd_train", setup / "sgd_test", tmp_path / "o",
                    progress=False)
