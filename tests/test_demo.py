import json

import pytest
import torch

from gvit.cli import main
from gvit.data import SHAPE_CLASSES, make_shapes
from gvit.gaussians import load_gaussians


def test_shapes_are_deterministic_and_well_formed():
    images, labels, masks = make_shapes(24, 32, seed=3)
    again = make_shapes(24, 32, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert images.shape == (24, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert labels.max() < len(SHAPE_CLASSES)
    area = masks.flatten(1).float().mean(1)
    assert (area > 0.03).all() and (area < 0.9).all()
    # the object differs from its surroundings
    for i in range(24):
        inside = images[i][:, masks[i]].mean(1)
        outside = images[i][:, ~masks[i]].mean(1)
        assert (inside - outside).abs().max() > 0.1
    with pytest.raises(ValueError, match="num_classes"):
        make_shapes(2, num_classes=99)


def test_demo_writes_report_and_loadable_gaussians(tmp_path, capsys):
    assert main(["fit-demo", "--images", "2", "--num-gaussians", "48", "--iters", "60", "--out", str(tmp_path),
                 "--quiet"]) == 0
    g, labels, meta = load_gaussians(tmp_path / "gaussians.safetensors")
    assert g.means.shape == (2, 48, 2) and labels.shape == (2,)
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    psnr = float(report.split("mean PSNR ")[1].split(" dB")[0])
    assert psnr > 25  # 60 steps already reconstruct the shapes well
    assert "mean PSNR" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(capsys):
    assert main(["fit-demo", "--iters", "-1"]) == 2
    assert "iters" in capsys.readouterr().err
    assert main(["fit-demo", "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err


def test_gvit_demo_trains_beside_a_patch_vit_and_writes_the_report(tmp_path, capsys):
    args = ["steps=8", "data=shapes:96", "limit_eval=24", "batch_size=16", "checkpoint_every=4", "log_every=2",
            "pretrain_until=0.5", "guidance_from=0.75"]  # 2 guidance steps, and their gamma = 0 control
    assert main(["demo", *args, "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gamma 0.2 against gamma 0 from the same state: top-1" in printed
    assert "encoder's Gaussians moved" in printed and "classifier's Gaussians moved" in printed
    assert "apart at the end" in printed and "opacity on the object" in printed
    assert "top-1" in printed and "patch ViT" in printed and printed.count("(val ") == 2  # GViT's and the baseline's
    assert printed.count(", train ") == 2  # and their top-1 on training images
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "gvit" and report["eval_images"] == 24 and 0 <= report["top1"] <= 1
    assert report["guidance"]["top1"] == report["top1"] and 0 <= report["guidance"]["control_top1"] <= 1
    assert set(report["guidance"]["encoder"]) >= {"shift_px", "control_shift_px", "object_share_control"}
    assert report["psnr"] > 5 and report["steps"] == 8 and 0 <= report["val_top1"] <= 1
    assert report["top1"] == json.loads((tmp_path / "run" / "result.json").read_text())["top1"]  # not evaluated twice
    (name, patch), = report["compare"].items()
    baseline = json.loads((tmp_path / "patch_vit" / "result.json").read_text())
    assert "patch ViT" in name and patch["top1"] == baseline["top1"] and baseline["step"] == 8
    for name in ("report.html", "examples.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    page = (tmp_path / "report.html").read_text()
    assert "examples.png" in page and "top-1" in page and "sample_image" in page and "same budget" in page
    # the examples figure is a real image with one row of four panels (input, render, ellipses, CDAM) per example
    from PIL import Image

    with Image.open(tmp_path / "examples.png") as im:
        assert 1.5 * im.width < im.height < 2.5 * im.width  # 8 rows of 4 square panels
    # a rerun with --resume trains nothing again and writes the same comparison
    mtime = (tmp_path / "patch_vit" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["demo", *args, "--out", str(tmp_path), "--quiet", "--resume"]) == 0
    assert (tmp_path / "patch_vit" / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "report.json").read_text())["compare"] == report["compare"]


def test_report_command_for_a_patch_vit(tmp_path, capsys):
    from gvit.train import make_config, train

    cfg = make_config(model="patch_vit", data="shapes:64", limit_eval=16, steps=3, batch_size=16,
                      classifier_size="micro", out=str(tmp_path / "run"))
    train(cfg, progress=False)
    assert main(["report", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "rep"),
                 "--examples", "3"]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"] == "patch_vit" and "psnr" not in report and report["eval_split"] == "test"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "of 16 test images" in page and "top-1 on training images" in page and report["train_eval_images"] == 16
    assert (tmp_path / "rep" / "examples.png").is_file()
    assert main(["report", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "rv"),
                 "--examples", "1", "eval_split=val", "val_every=4"]) == 0  # the split it evaluated, named
    assert json.loads((tmp_path / "rv" / "report.json").read_text())["eval_split"] == "val"
    assert " val images" in (tmp_path / "rv" / "report.html").read_text()
    assert main(["report", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_the_demos_patch_vit_shares_the_budget_and_keeps_its_own_tuned_settings(tmp_path):
    from gvit.tools.demo import DEMO_PATCH_VIT, baseline_config, demo_config

    gvit_cfg = demo_config(tmp_path)
    patch = baseline_config(gvit_cfg, tmp_path)
    assert patch.model == "patch_vit" and patch.out == str(tmp_path / "patch_vit")
    for key in ("data", "val_every", "steps", "batch_size", "base_lr", "seed", "classifier_size", "limit_eval"):
        assert getattr(patch, key) == getattr(gvit_cfg, key), key
    assert DEMO_PATCH_VIT and all(getattr(patch, k) == v for k, v in DEMO_PATCH_VIT.items())
    assert not hasattr(patch, "phase_lr")  # GViT's stage settings do not reach the baseline
