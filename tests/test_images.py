import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gvit.data.images import ImageFolder, ImageReadError, read_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_and_tiff_roundtrip(tmp_path):
    arr = _rgb()
    for ext in ("png", "tif"):
        Image.fromarray(arr).save(tmp_path / f"a.{ext}")
        img = read_image(tmp_path / f"a.{ext}")
        assert img.shape == (3, 5, 7) and img.dtype == torch.float32
        assert torch.allclose(img, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_grayscale_is_replicated(tmp_path):
    gray = _rgb()[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (3, 5, 7) and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.allclose(img[0], torch.from_numpy(gray).float() / 255)


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (0, 0, 255, 0)        # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)        # half black -> mid grey
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(img[:, 0, 1], torch.ones(3))
    assert torch.allclose(img[:, 1, 0], torch.full((3,), 1 - 128 / 255), atol=1e-6)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    expected = torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.allclose(read_image(tmp_path / "p.png"), expected)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    img = read_image(tmp_path / "pt.png")
    assert img.shape == (3, 5, 7) and ((img == 1).all(0)).any()  # palette entry 0 became white


def test_16_bit_uses_the_full_range(tmp_path):
    arr = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    img = read_image(tmp_path / "d.png")
    assert torch.allclose(img[0, 0], torch.tensor([0, 1000 / 65535, 1.0]), atol=1e-6)


def test_tiny_image_and_min_size(tmp_path):
    Image.fromarray(_rgb(1, 1)).save(tmp_path / "t.png")
    assert read_image(tmp_path / "t.png").shape == (3, 1, 1)
    with pytest.raises(ImageReadError, match=r"t\.png.*min_size=4"):
        read_image(tmp_path / "t.png", min_size=4)


@pytest.mark.parametrize("content", [b"", b"definitely not an image", None])
def test_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a real PNG cut in half
        Image.fromarray(_rgb(40, 40)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(path)
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def _tree(root: Path):
    for label, cls in enumerate(["cat", "ant", "bee"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_rgb(4, 4, seed=10 * label + i)).save(root / cls / f"{i}.png")
    (root / "notes.txt").write_text("ignored")


def test_imagefolder_directory_and_zip_agree(tmp_path):
    _tree(tmp_path / "tree")
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "tree").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "tree").as_posix() + ("/" if p.is_dir() else ""))
    folder, zipped = ImageFolder(tmp_path / "tree"), ImageFolder(archive)
    assert folder.classes == zipped.classes == ["ant", "bee", "cat"]
    assert len(folder) == len(zipped) == 6
    for i in range(6):
        (a, la), (b, lb) = folder[i], zipped[i]
        assert la == lb and torch.equal(a, b)
    assert folder.labels.tolist() == [0, 0, 1, 1, 2, 2]
    clone = pickle.loads(pickle.dumps(zipped))  # what a DataLoader worker receives
    assert torch.equal(clone[3][0], zipped[3][0])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="zip"):
        ImageFolder(tmp_path / "x.zip")
    _tree(tmp_path / "tree")
    (tmp_path / "tree" / "ant" / "2.png").write_bytes(b"broken")
    ds = ImageFolder(tmp_path / "tree")
    with pytest.raises(ImageReadError, match=r"ant/2\.png"):
        [ds[i] for i in range(len(ds))]


@pytest.mark.skipif(not (SHARED / "cifar10" / "test.zip").exists(), reason="needs ../shared/data")
def test_reads_the_shared_cifar10_and_fashion_mnist_zips():
    cifar = ImageFolder(SHARED / "cifar10" / "test.zip")
    assert len(cifar) == 10000 and cifar.classes[0] == "airplane" and cifar.classes[-1] == "truck"
    img, label = cifar[0]
    assert img.shape == (3, 32, 32) and label == 0
    fm = ImageFolder(SHARED / "fashion_mnist" / "test.zip")
    img, _ = fm[0]
    assert img.shape == (3, 28, 28) and torch.equal(img[0], img[2])


# EXIF orientation -> how a viewer shows the stored pixels (the EXIF 2.3 table), written independently
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, -1)[::-1],
           8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path, orientation, suffix):
    from gvit.data.images import image_size

    stored = np.zeros((16, 32, 3), np.uint8)  # 8x8 blocks, so JPEG keeps the edges
    stored[:8, :16] = (255, 0, 0)  # a block in one corner and a band on one edge tell every orientation apart
    stored[:, 24:] = (0, 0, 120)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    lossless = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **lossless)
    expected = torch.from_numpy(np.ascontiguousarray(UPRIGHT[orientation](stored))).permute(2, 0, 1).float() / 255
    image = read_image(path)
    assert image.shape == expected.shape and image_size(path) == tuple(expected.shape[1:])
    assert (image - expected).abs().mean() < (0.02 if suffix == ".jpg" else 1e-6)


def test_a_file_name_that_is_not_valid_text_costs_no_image_its_result(tmp_path, capsys):
    import os

    from gvit.cli import main
    from gvit.gaussians import load_gaussians

    photos = tmp_path / "photos"
    photos.mkdir()
    names = [b"ok.png", b"bad\xff\xfename.png"]
    try:
        for name in names:
            Image.fromarray(np.full((12, 12, 3), 90, np.uint8)).save(os.path.join(os.fsencode(photos), name))
    except OSError:
        pytest.skip("this file system refuses names that are not valid UTF-8")
    out = tmp_path / "fitted"
    args = ["fit", str(photos), "--out", str(out), "--num-gaussians", "8", "--iters", "10", "--quiet"]
    assert main(args) == 0
    assert "fitted 2 image(s)" in capsys.readouterr().out
    bad = os.fsdecode(b"bad\xff\xfename")
    g, _, meta = load_gaussians(out / f"{bad}.gaussians.safetensors")
    assert g.num_gaussians == 8 and "\ufffd" in meta["source"]  # stored as valid text
    assert main(args) == 0 and "2 already done" in capsys.readouterr().out  # the rerun finds both done
    import csv

    from gvit.files import original_name

    text = (out / "metrics.csv").read_bytes().decode("utf-8")  # valid UTF-8: csv and pandas read it as it is
    names = [row["name"] for row in csv.DictReader(text.splitlines())]
    assert "bad\\udcff\\udcfename" in names and os.fsencode(original_name(names[0])) == b"bad\xff\xfename"
