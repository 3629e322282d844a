"""The .gvc codec: quantiser against a float64 formulation, exact round trips of symbols, files and fits,
the rate target, damaged files (a seeded fuzz of a few thousand mutations), the commands and coded shards."""

import csv
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from gvit import codec
from gvit.cli import main
from gvit.codec import BitDepths, CodecError, canonical_order, dequantize, project, quantize
from gvit.codec.container import Header, pack, unpack
from gvit.codec.entropy import decode_symbols, encode_symbols, placement_bits
from gvit.codec.quantize import morton, scale_range, unmorton
from gvit.data import read_image
from gvit.data.shards import load_shards, read_manifest, shard_name
from gvit.fit import FitConfig, fit_gaussians
from gvit.gaussians import Gaussians
from gvit.losses import psnr
from gvit.render import render
from gvit.viz import save_png, to_uint8


def _random_gaussians(k: int, seed: int = 0, h: int = 40, w: int = 56) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.rand(1, k, 2, generator=g) * 2 - 1,
                     torch.exp(torch.empty(1, k, 2).uniform_(math.log(0.3 / w), math.log(0.5), generator=g)),
                     torch.rand(1, k, generator=g) * 12 - 6, torch.rand(1, k, 3, generator=g),
                     torch.rand(1, k, generator=g) * 0.9 + 0.1)


def _image(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """A smooth test picture: two gradients and a disc."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disc = (((yy - 0.5) ** 2 + (xx - 0.4 - 0.1 * seed) ** 2) < 0.08).float()
    return torch.stack([xx, yy, 0.3 + 0.6 * disc]).clamp(0, 1)


def _symbols_equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("qx", "qy", "size", "aspect", "angle", "color", "opacity"))


def test_dequantised_values_lie_within_half_a_step_of_a_float64_formulation():
    h, w, bits = 40, 56, BitDepths()
    g = _random_gaussians(300)
    sym = quantize(g, h, w, bits)[0]
    d = dequantize(sym, h, w, bits)
    keep = (g.opacities[0].double() * 7).round() > 0  # opacity 3 bits: 0 is dropped
    assert len(sym) == int(keep.sum())
    m = g.means[0, keep].double()
    cell = torch.tensor([2 / (w * 4), 2 / (h * 4)], dtype=torch.float64)
    assert ((d.means[0].double() - m).abs() <= cell / 2 + 1e-7).all()
    s = g.scales[0, keep].double()
    swap = s[:, 0] < s[:, 1]
    long_short = torch.where(swap[:, None], s.flip(-1), s)
    step = 0.25  # octaves
    assert (torch.log2(d.scales[0].double() / long_short).abs() <= step / 2 + 1e-6).all()
    # the covariance is the same: compare Sigma in float64 where the shape is not round
    def sigma(sc, an):
        c, si = torch.cos(an), torch.sin(an)
        r = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)
        return r @ torch.diag_embed(sc.square()) @ r.transpose(-1, -2)
    target = sigma(s, g.angles[0, keep].double())
    got = sigma(long_short, d.angles[0].double())  # the exact scales at the quantised angle
    elongated = (long_short[:, 0] / long_short[:, 1]) > 1.5
    rel = (got - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)
    assert (rel[elongated] < math.pi / 64 * 2).all()  # the angle within half of a 6-bit step of pi
    assert ((d.colors[0].double() - g.colors[0, keep].double()).abs() <= 0.5 / 31 + 1e-7).all()
    assert ((d.opacities[0].double() - g.opacities[0, keep].double()).abs() <= 0.5 / 7 + 1e-7).all()


def test_quantising_dequantised_values_gives_the_same_symbols():
    h, w, bits = 33, 65, BitDepths(position=1, scale=3, angle=5, color=6, opacity=4)
    sym = quantize(_random_gaussians(500, seed=3, h=h, w=w), h, w, bits)[0]
    again = quantize(dequantize(sym, h, w, bits), h, w, bits)[0]
    assert _symbols_equal(sym, again)


def test_morton_codes_round_trip_and_order_by_quadrant():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 1 << 16, 1000), rng.integers(0, 1 << 16, 1000)
    bx, by = unmorton(morton(x, y))
    assert (bx == x).all() and (by == y).all()
    assert morton(np.array([1]), np.array([0]))[0] == 1 and morton(np.array([0]), np.array([1]))[0] == 2


def test_symbols_round_trip_through_the_entropy_coder_exactly():
    h, w, bits = 40, 56, BitDepths()
    for k, seed in ((1, 0), (2, 1), (300, 2), (3000, 3)):
        sym = quantize(_random_gaussians(k, seed), h, w, bits)[0]
        sym = sym.take(canonical_order(sym))
        back = decode_symbols(encode_symbols(sym, h, w, bits), len(sym), h, w, bits)
        assert _symbols_equal(sym, back)
    # the corners of the image, repeated positions (gaps of 0) and one size group
    g = _random_gaussians(6)
    g.means[0] = torch.tensor([[-1, -1], [1, 1], [1, 1], [-1, 1], [1, -1], [0, 0]], dtype=torch.float32)
    g.scales[0] = 0.1
    sym = quantize(g, h, w, bits)[0]
    sym = sym.take(canonical_order(sym))
    assert _symbols_equal(sym, decode_symbols(encode_symbols(sym, h, w, bits), len(sym), h, w, bits))
    empty = sym.take(torch.zeros(0, dtype=torch.long))
    assert len(decode_symbols(encode_symbols(empty, h, w, bits), 0, h, w, bits)) == 0


def test_a_set_out_of_canonical_order_is_refused():
    h, w, bits = 40, 56, BitDepths()
    sym = quantize(_random_gaussians(50), h, w, bits)[0]
    order = canonical_order(sym)
    with pytest.raises(ValueError, match="canonical order"):
        encode_symbols(sym.take(order.flip(0)), h, w, bits)


def test_canonical_placement_costs_fewer_bits_than_a_listed_order():
    h, w, bits = 64, 64, BitDepths()
    sym = quantize(_random_gaussians(2000, h=h, w=w), h, w, bits)[0]
    cost = placement_bits(sym, h, w, bits)
    assert cost["canonical"] < cost["listed"] and cost["saved"] > 5
    assert cost["log2_factorial"] == pytest.approx(math.lgamma(len(sym) + 1) / math.log(2) / len(sym))


def test_the_projection_passes_gradients_straight_through_and_orders_sets_canonically():
    h, w, bits = 40, 56, BitDepths()
    g = _random_gaussians(64)
    means = g.means.clone().requires_grad_(True)
    colors = g.colors.clone().requires_grad_(True)
    proj, order = project(Gaussians(means, g.scales, g.angles, colors, g.opacities), h, w, bits)
    weight = torch.randn_like(means)
    (proj.means * weight).sum().add((proj.colors * 2).sum()).backward()
    assert torch.equal(means.grad, weight) and torch.equal(colors.grad, torch.full_like(colors, 2.0))
    kept = int(proj.valid.sum())
    sym = quantize(g, h, w, bits)[0]
    assert kept == len(sym) and proj.valid[0, order[0, :kept]].all() and not proj.valid[0, order[0, kept:]].any()
    d = dequantize(sym.take(canonical_order(sym)), h, w, bits)
    assert torch.equal(proj.means[0, order[0, :kept]].detach(), d.means[0])
    assert torch.equal(proj.colors[0, order[0, :kept]].detach(), d.colors[0])


def test_a_fit_with_the_projection_ends_on_the_stored_values():
    x = _image()
    h, w = x.shape[-2:]
    bits = BitDepths()
    res = fit_gaussians(x[None], FitConfig(num_gaussians=24, iters=60), project=lambda g: project(g, h, w, bits),
                        project_from=0.5)
    n = int(res.gaussians.valid.sum())
    sym = quantize(res.gaussians, h, w, bits)[0]
    assert len(sym) == n and torch.equal(canonical_order(sym), torch.arange(n))  # already canonical
    assert torch.equal(dequantize(sym, h, w, bits).means[0], res.gaussians.means[0, :n])
    assert float(res.psnr[0]) == pytest.approx(float(psnr(render(res.gaussians, height=h, width=w).clamp(0, 1),
                                                          x[None])[0]), abs=1e-5)


def test_decode_gives_exactly_the_encoders_values_and_its_psnr():
    x = _image()
    res = codec.encode_image(x, num_gaussians=32)
    g = codec.decode(res.data)
    for f in ("means", "scales", "angles", "colors", "opacities"):
        assert torch.equal(getattr(g, f), getattr(res.gaussians, f)), f
    image = codec.decode_image(res.data)
    assert torch.equal(image, res.rendered)
    assert float(psnr(image[None], x[None])[0]) == pytest.approx(res.psnr, abs=1e-6)
    assert res.psnr > 24 and res.bpp == 8 * len(res.data) / (24 * 32)
    big = codec.decode_image(res.data, scale=2.5)
    assert big.shape == (3, 60, 80)
    assert torch.equal(big, render(g, height=60, width=80).clamp(0, 1)[0])
    header = codec.read_header(res.data)
    assert (header.height, header.width, header.count, header.bits) == (24, 32, g.num_gaussians, BitDepths())


def test_a_rate_target_is_met_and_more_bits_give_more_quality():
    x = _image(32, 32)
    low, high = (codec.encode_image(x, bpp=b) for b in (1.5, 4.0))
    assert low.bpp <= 1.5 and high.bpp <= 4.0 and high.count > low.count and high.psnr > low.psnr
    assert high.bpp > 0.6 * 4.0  # the predicted budget lands near the target
    with pytest.raises(ValueError, match="exactly one"):
        codec.encode_image(x, bpp=1.0, num_gaussians=8)
    with pytest.raises(ValueError, match="bpp"):
        codec.encode_image(x, bpp=float("nan"))


@pytest.mark.parametrize("bits", [dict(position=5), dict(angle=0), dict(color=11), dict(opacity=True)])
def test_bit_depths_out_of_range_are_named(bits):
    with pytest.raises(ValueError, match=next(iter(bits))):
        BitDepths(**bits)


def _file(k: int = 40) -> bytes:
    h, w, bits = 20, 30, BitDepths()
    return codec.encode_gaussians(_random_gaussians(k, h=h, w=w), h, w, bits=bits)


def test_damaged_headers_are_one_line_errors():
    data = _file()
    cases = {b"XXXX" + data[4:]: "magic", data[:10]: "truncated", data[:-2]: "truncated",
             data[:-4] + bytes(4): "checksum", bytes([data[0] ^ 1]) + data[1:]: "magic"}
    newer = bytearray(data)
    newer[4] = 9
    newer[-4:] = struct.pack("<I", zlib.crc32(bytes(newer[:-4])))
    cases[bytes(newer)] = "newer"
    for bad, what in cases.items():
        with pytest.raises(CodecError, match=what) as info:
            codec.decode(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(CodecError, match="position bits"):
        Header(40000, 30, 1, BitDepths(position=2)).check()


def _decodes_or_refuses(data: bytes) -> bool:
    """True when ``data`` decodes to well-formed Gaussians, False when it is refused with a CodecError."""
    try:
        g = codec.decode(data)
    except CodecError as exc:
        assert "\n" not in str(exc)
        return False
    assert all(torch.isfinite(getattr(g, f)).all() for f in ("means", "scales", "angles", "colors", "opacities"))
    assert (g.means.abs() <= 1).all() and (g.scales > 0).all() and ((g.colors >= 0) & (g.colors <= 1)).all()
    return True


def test_a_fuzz_of_mutated_files_never_crashes_or_decodes_damage():
    rng = np.random.default_rng(1234)
    data = _file(60)
    decoded = 0
    for trial in range(3000):
        buf = bytearray(data)
        kind = trial % 4
        if kind == 0:  # flip bits
            for _ in range(rng.integers(1, 4)):
                i = rng.integers(len(buf))
                buf[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # truncate
            buf = buf[:rng.integers(0, len(buf))]
        elif kind == 2:  # insert or delete bytes
            i = int(rng.integers(len(buf)))
            buf = buf[:i] + bytes(rng.integers(0, 256, rng.integers(1, 5)).astype(np.uint8)) + buf[i + 1:]
        else:  # damage the payload and fix the checksum: the decoder's own checks must hold
            for _ in range(rng.integers(1, 6)):
                i = rng.integers(20, len(buf) - 4)
                buf[i] = int(rng.integers(256))
            buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
        ok = _decodes_or_refuses(bytes(buf))
        if kind < 3 and bytes(buf) != data:
            assert not ok  # the checksum catches every accidental damage
        decoded += ok
    assert decoded < 3000


def test_the_container_round_trips_its_header():
    header = Header(17, 300, 5, BitDepths(position=1, scale=3, angle=7, color=8, opacity=2), mode="sum")
    words = np.arange(7, dtype=np.uint32)
    back, got = unpack(pack(header, words))
    assert back == header and (got == words).all()


def test_encode_and_decode_commands_write_resume_and_name_damaged_files(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        save_png(photos / f"p{i}.png", to_uint8(_image(20, 28, seed=i)))
    out = tmp_path / "coded"
    assert main(["encode", str(photos), "--out", str(out), "--num-gaussians", "24", "--quiet"]) == 0
    with open(out / "codec.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"p0", "p1"}
    for name, row in rows.items():
        data = (out / f"{name}.gvc").read_bytes()
        assert int(row["bytes"]) == len(data) and float(row["bpp"]) == pytest.approx(8 * len(data) / (20 * 28), 1e-3)
        decoded = codec.decode_image(data)
        original = read_image(photos / f"{name}.png")
        assert float(row["psnr"]) == pytest.approx(float(psnr(decoded[None], original[None])[0]), abs=2e-3)
    before = (out / "p0.gvc").stat().st_mtime_ns
    assert main(["encode", str(photos), "--out", str(out), "--num-gaussians", "24", "--quiet"]) == 0
    assert "2 already done" in capsys.readouterr().out and (out / "p0.gvc").stat().st_mtime_ns == before
    assert main(["decode", str(out), "--out", str(tmp_path / "png"), "--scale", "2", "--quiet"]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "png" / "p0.png").size == (56, 40)
    (out / "p1.gvc").write_bytes((out / "p1.gvc").read_bytes()[:-3])
    capsys.readouterr()
    assert main(["decode", str(out / "p1.gvc"), "--out", str(tmp_path / "png2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "p1.gvc" in err and "truncated" in err and len(err.splitlines()) == 1
    assert main(["encode", str(photos), "--out", str(tmp_path / "x"), "--bpp", "-1", "--quiet"]) == 2


def test_fit_dataset_stores_coded_shards_that_offline_training_reads(tmp_path, capsys):
    out = tmp_path / "gs"
    assert main(["fit-dataset", "--data", "shapes", "--split", "test", "--limit", "10", "--out", str(out),
                 "--dtype", "gvc", "--num-gaussians", "16", "--iters", "40", "--shard-size", "6", "--quiet"]) == 0
    g, labels, indices, manifest = load_shards(out)
    assert g.batch_size == 10 and len(labels) == 10 and g.valid is not None
    stored = sum((out / shard_name(s)).stat().st_size for s in range(2))
    assert manifest["compression_vs_8bit"] == pytest.approx(3 * 32 * 32 * 10 / stored)
    assert read_manifest(out)["bytes_per_image"] == pytest.approx(stored / 10)
    shard = out / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last image's .gvc bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.*image 5"):
        load_shards(out)


def test_fit_reports_the_measured_bytes_of_its_files(tmp_path):
    photos = tmp_path / "p"
    photos.mkdir()
    save_png(photos / "a.png", to_uint8(_image(16, 16)))
    assert main(["fit", str(photos), "--out", str(tmp_path / "f"), "--num-gaussians", "8", "--iters", "5",
                 "--quiet", "--no-pictures"]) == 0
    with open(tmp_path / "f" / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    size = (tmp_path / "f" / "a.gaussians.safetensors").stat().st_size
    assert int(row["bytes"]) == size and float(row["compression"]) == pytest.approx(3 * 16 * 16 / size, abs=1e-3)


def test_scale_range_covers_an_eighth_of_a_pixel_to_half_the_image():
    lo, hi = scale_range(100, 300, BitDepths(scale=2))
    assert lo == -12 and hi == math.ceil(math.log2(150) * 4)
