"""model=tokenizer through the trainer, and the gvit tokens jobs (token files, decoding, report)."""

import json

import pytest
import torch

from gvit.cli import main
from gvit.train import make_config, load_trained, train
from gvit.tools.tokens import decode_tokens, encode_tokens, load_tokens, save_tokens


def _cfg(tmp_path, kind="gaussian", **kw):
    values = dict(model="tokenizer", tokenizer=kind, data="shapes:96", limit_eval=24, image_size=16, steps=6,
                  batch_size=8, num_tokens=16, codebook_size=16, tokenizer_channels=16, pixel_loss="l1",
                  lambda_perc=0.0, log_every=1, checkpoint_every=3, crop_scale_min=1.0, out=str(tmp_path / kind))
    return make_config(**(values | kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {kind: (train(_cfg(tmp, kind), progress=False), tmp / kind / "checkpoint.pt") for kind in ("vq", "gaussian")}


def test_training_logs_losses_and_evaluates_reconstruction_and_the_codebook(trained):
    result, ckpt = trained["gaussian"]
    assert result["finished"] and "top1" not in result
    assert result["eval_images"] == 24 and 0 < result["usage"] <= 1 and result["perplexity"] >= 1
    assert result["psnr"] > 5 and 0 <= result["coverage"] <= 1 and result["bits_per_image"] == 16 * (4 + 160)
    rows = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("loss_rec" in r and "loss_commit" in r for r in rows)
    assert trained["vq"][0]["coverage"] == 1.0


def test_resume_is_exact_codebook_included(tmp_path):
    full = train(_cfg(tmp_path, out=str(tmp_path / "full")), progress=False)
    cfg = _cfg(tmp_path, out=str(tmp_path / "split"))
    train(cfg, stop_after=3, progress=False)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["psnr"] == full["psnr"] and resumed["usage"] == full["usage"]
    a = load_trained(tmp_path / "full" / "checkpoint.pt").model.quantizer.codebook
    b = load_trained(tmp_path / "split" / "checkpoint.pt").model.quantizer.codebook
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["vq", "gaussian"])
def test_decoding_the_token_file_equals_the_forward_pass(trained, tmp_path, kind):
    _, ckpt = trained[kind]
    summary = encode_tokens(ckpt, tmp_path / "enc", limit=10, progress=False)
    tensors, meta = load_tokens(tmp_path / "enc" / "tokens.safetensors")
    assert summary["images"] == 10 and tensors["indices"].shape == (10, 16) and meta["kind"] == kind
    assert ("means" in tensors) == (kind == "gaussian") and tensors["labels"].shape == (10,)
    decode_tokens(ckpt, tmp_path / "enc" / "tokens.safetensors", tmp_path / "dec")
    from safetensors.torch import load_file
    decoded = load_file(str(tmp_path / "dec" / "decoded.safetensors"))["images"]
    run = load_trained(ckpt)
    dataset, collate = run.test_data()
    images, _ = collate([dataset[i] for i in range(10)])
    with torch.no_grad():
        forward = run.model(images, torch.Generator().manual_seed(run.cfg.seed)).reconstruction.clamp(0, 1)
    assert torch.allclose(decoded, forward, atol=1e-5)
    assert (tmp_path / "dec" / "decoded.png").is_file()


def test_report_through_the_cli(trained, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["tokens", "report", "--checkpoint", str(trained["vq"][1]), "--also", str(trained["gaussian"][1]),
                 "--names", "A", "B", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["tokenizers"]] == ["A", "B"]
    assert (out / "reconstructions.png").stat().st_size > 1000 and "codebook usage" in capsys.readouterr().out


def test_bad_token_files_and_mismatched_tokenizers_are_named(trained, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_tokens(bad, torch.zeros(2, 16, dtype=torch.long), geometry={"means": torch.full((2, 16, 2), float("nan"))})
    with pytest.raises(ValueError, match="means must be finite"):
        load_tokens(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_tokens(tmp_path / "junk.safetensors")
    encode_tokens(trained["vq"][1], tmp_path / "enc", limit=4, progress=False)
    with pytest.raises(ValueError, match="kind=vq"):
        decode_tokens(trained["gaussian"][1], tmp_path / "enc" / "tokens.safetensors", tmp_path / "dec")
    assert not (tmp_path / "dec").exists()
    wrong = tmp_path / "range.safetensors"
    save_tokens(wrong, torch.full((2, 16), 99, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must lie"):
        decode_tokens(trained["vq"][1], wrong, tmp_path / "dec2")


def test_tokens_jobs_refuse_a_classifier_checkpoint(tmp_path):
    cfg = make_config(model="patch_vit", data="shapes:32", limit_eval=8, image_size=16, steps=1, batch_size=8,
                      classifier_size="micro", out=str(tmp_path / "pv"))
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        encode_tokens(tmp_path / "pv" / "checkpoint.pt", tmp_path / "enc", progress=False)


def test_cli_decode_without_a_token_file_is_one_line(trained, tmp_path, capsys):
    assert main(["tokens", "decode", "--checkpoint", str(trained["vq"][1]), "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens" in err[0] and not (tmp_path / "d").exists()


def test_classifier_jobs_refuse_a_tokenizer_checkpoint(trained, tmp_path, capsys):
    ckpt = str(trained["vq"][1])
    assert main(["report", "--checkpoint", ckpt, "--out", str(tmp_path / "r")]) != 0
    assert main(["interpret", "--checkpoint", ckpt, "--out", str(tmp_path / "i")]) != 0
    err = capsys.readouterr().err
    assert "gvit tokens report" in err and "needs a GViT checkpoint" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "i").exists()
