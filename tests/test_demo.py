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
    assert main(["demo", "--images", "2", "--num-gaussians", "48", "--iters", "60", "--out", str(tmp_path),
                 "--quiet"]) == 0
    g, labels, meta = load_gaussians(tmp_path / "gaussians.safetensors")
    assert g.means.shape == (2, 48, 2) and labels.shape == (2,)
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    psnr = float(report.split("mean PSNR ")[1].split(" dB")[0])
    assert psnr > 25  # 60 steps already reconstruct the shapes well
    assert "mean PSNR" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--iters", "-1"]) == 2
    assert "iters" in capsys.readouterr().err
    assert main(["demo", "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err
