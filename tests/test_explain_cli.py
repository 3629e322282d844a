import json

import numpy as np
import pytest
from PIL import Image

from gvit.cli import main
from gvit.train import make_config, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = make_config(data="shapes:64", limit_eval=8, steps=3, batch_size=16, encoder_size="micro",
                      classifier_size="micro", num_gaussians=16, sample_image=True, g0_layout="stratified",
                      out=str(out))
    train(cfg, progress=False)
    return out / "checkpoint.pt"


def test_explain_handles_odd_images_and_writes_panels_and_index(tmp_path, checkpoint, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(images / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(images / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (3, 2, 3), dtype=np.uint8)).save(images / "sub" / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)).save(images / "large.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(images / "deep16.png")
    out = tmp_path / "out"
    assert main(["explain", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet",
                 "--batch-size", "2"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["images"]) == 5 and summary["grid"] == 16
    for record in summary["images"]:
        assert (out / record["panel"]).stat().st_size > 5000
        assert len(record["top5"]) == 5 and 0.5 < sum(p for _, p in record["top5"]) <= 1 + 1e-4  # 5 of 6 classes
        assert record["top5"][0][1] >= record["top5"][-1][1]
    assert (out / "sub" / "tiny.png").is_file()
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 5 and "sub/tiny.png" in page
    assert "index.html" in capsys.readouterr().out
    # a named class is explained for every image
    assert main(["explain", str(images / "gray.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "c"),
                 "--class", "ring", "--quiet"]) == 0
    assert json.loads((tmp_path / "c" / "explain.json").read_text())["images"][0]["explained_class"] == "ring"


def test_explain_errors_name_the_input(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["explain", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.html").exists()
    assert main(["explain", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--quiet",
                 "--skip-bad"]) == 0
    assert len(json.loads((tmp_path / "o" / "explain.json").read_text())["skipped"]) == 1
    assert main(["explain", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["explain", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                 "--class", "dragon"]) == 2
    assert "dragon" in capsys.readouterr().err


def test_explain_maps_api_shapes_and_ranges(checkpoint):
    import torch

    from gvit.explain import explain_images
    from gvit.train import load_trained

    model = load_trained(checkpoint).model
    maps = explain_images(model, torch.rand(3, 3, 32, 32), grid=8)
    assert maps["cdam"].shape == (3, 16) and maps["cdam_map"].shape == (3, 8, 8)
    assert torch.allclose(maps["cdam_map"].sum((1, 2)), maps["cdam"].sum(1), atol=1e-5)
    assert maps["det_map"].shape == (3, 32, 32) and maps["rendered"].shape == (3, 3, 32, 32)
    assert (maps["det_sigma"] > 0).all() and maps["top_probs"].shape == (3, 5)
    assert torch.equal(maps["target"], maps["logits"].argmax(-1))
    assert 0 <= float(maps["rendered"].min()) and float(maps["rendered"].max()) <= 1
    with pytest.raises(ValueError, match="class 9"):
        explain_images(model, torch.rand(1, 3, 32, 32), target=9)


def test_interpret_reports_correlations_and_mask_mass(tmp_path, checkpoint, capsys):
    out = tmp_path / "interp"
    assert main(["interpret", "--checkpoint", str(checkpoint), "--out", str(out), "--limit", "24", "--batch-size",
                 "10", "--quiet"]) == 0
    assert "Spearman(log det Sigma, CDAM)" in capsys.readouterr().out
    f = json.loads((out / "interpret.json").read_text())
    assert f["images"] == 24 and 0 <= f["top1"] <= 1
    for key in ("det_cdam_spearman", "det_abs_cdam_spearman"):
        assert -1 <= f[key]["mean"] <= 1 and f[key]["images"] > 0
    m = f["cdam_mass_inside"]  # the shapes have object masks
    assert all(0 <= m[k]["mean"] <= 1 for k in ("inside", "gaussians_inside", "area"))
    assert 0.02 < m["area"]["mean"] < 0.9
    assert "positive CDAM mass on object Gaussians" in (out / "interpret.md").read_text()
    assert main(["interpret", "--checkpoint", str(checkpoint), "--out", str(out), "--limit", "0"]) == 2
