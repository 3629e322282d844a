"""model=splat_distill (GaussianVision stage 1): Gaussians paired with their images, only the stem
learns, statistics from the training Gaussians, mirrored sets render mirrored, bad settings."""

import pytest
import torch

from gvit.fit import FitConfig
from gvit.gaussians import Gaussians
from gvit.models.splat_stem import splat_set_features, splat_statistics
from gvit.render import render
from gvit.tools.fit_dataset import fit_dataset
from gvit.train import load_config, train
from gvit.train.checkpoint import load_checkpoint
from gvit.train.splat_distill_step import PairedGaussians, mirror_sets


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    quiet = dict(progress=False, log=lambda *_: None)
    teacher = load_config(None, ["model=clip", "data=shapes:64", "steps=4", "batch_size=16", "limit_eval=16",
                                 "text_vocab=300", "prompt=a {}", f"out={root / 'teacher'}"])
    train(teacher, **quiet)
    fit = FitConfig(num_gaussians=16, iters=10, mode="sum")
    for split, n in (("train", 32), ("test", 16)):
        fit_dataset("captioned-shapes", root / split, fit, split=split, limit=n, **quiet)
    fit_dataset("shapes", root / "plain", fit, split="test", limit=8, **quiet)
    cfg = load_config(None, ["model=splat_distill", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"offline_train={root / 'train'}", f"offline_eval={root / 'test'}", "steps=4",
                             "batch_size=8", "stem_depth=1", "stem_tokens=8", "stem_width=32", f"out={root / 'run'}"])
    return root, train(cfg, **quiet)


def test_only_the_stem_learns_and_it_is_measured_against_the_teacher(stage1):
    root, result = stage1
    assert result["finished"] and result["eval_images"] == 16
    assert -1 <= result["cosine"] <= 1 and 0 < result["trainable_fraction"] < 1
    assert 0 <= result["top1"] <= 1 and 0 <= result["teacher_top1"] <= 1
    for key in ("teacher_knn", "knn", "teacher_linear", "linear", "top1_held_out",
                "teacher_top1_held_out", "i2t_r1", "t2i_r10", "teacher_i2t_r5", "teacher_t2i_r1"):
        assert 0 <= result[key] <= 1
    assert result["i2t_r1"] <= result["i2t_r5"] <= result["i2t_r10"]
    teacher = load_checkpoint(root / "teacher" / "checkpoint.pt")["clip"]
    student = load_checkpoint(root / "run" / "checkpoint.pt")["student"]
    assert all(torch.equal(student[f"clip.{k}"], v) for k, v in teacher.items())  # the tower stayed frozen
    g = PairedGaussians(root / "train").gaussians
    mean, std = splat_statistics(splat_set_features(g, "sum"), g.valid)
    torch.testing.assert_close(student["stem.feature_mean"], mean)
    torch.testing.assert_close(student["stem.feature_std"], std)


def test_paired_items_are_the_images_the_gaussians_were_fitted_to(stage1):
    root, _ = stage1
    from gvit.data import open_dataset

    data = PairedGaussians(root / "test")
    (image, g, caption), label = data[3]
    source = open_dataset("captioned-shapes", "test")
    assert (
        caption == source.captions[data.indices[3]] and data.held_out.tolist() == source.held_out[data.indices].tolist()
    )
    assert data.held_out.any()  # the test images include pairs training never showed
    rendered = render(g, height=32, width=32, mode="sum")[0]
    assert 10 * torch.log10(1 / (rendered.clamp(0, 1) - image).pow(2).mean()) > 12  # close to its own image
    other = data[4][0][0]
    assert (rendered.clamp(0, 1) - image).pow(2).mean() < (rendered.clamp(0, 1) - other).pow(2).mean()
    assert label == int(data.targets[3]) and data.classes[0] == "circle"
    assert (data.split, PairedGaussians(root / "train").split) == ("test", "train")  # the results' eval_split


def test_a_run_with_unseen_classes_reads_gaussian_folders_without_them_and_evaluates_them(stage1, tmp_path):
    root, _ = stage1
    cfg = load_config(None, ["model=splat_distill", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"offline_train={root / 'train'}", f"offline_eval={root / 'test'}", "steps=2",
                             "batch_size=8", "stem_depth=1", "stem_tokens=8", "stem_width=32", "unseen_classes=circle",
                             "probe_images=0", f"out={tmp_path / 'run'}"])
    full = PairedGaussians(root / "train")
    kept = PairedGaussians.for_run(root / "train", cfg, train=True)
    assert 0 < len(kept) < len(full) and (kept.targets != 0).all()  # circle is class 0
    assert kept.captions == [c for c, t in zip(full.captions, full.targets.tolist()) if t != 0]
    assert torch.equal(kept.gaussians.means, full.gaussians.means[full.targets != 0])
    marked = PairedGaussians.for_run(root / "test", cfg, train=False)
    assert marked.unseen == [0] and marked.held_out.tolist() == (marked.targets == 0).tolist()
    result = train(cfg, progress=False, log=lambda *_: None)
    for key in ("top1_unseen", "teacher_top1_unseen", "top1_seen", "teacher_top1_seen"):
        assert 0 <= result[key] <= 1
    assert result["top1_unseen"] == 1.0  # one unseen class: among the unseen, the only candidate


def test_without_captions_of_its_own_an_item_is_captioned_by_its_class_prompt(stage1, tmp_path):
    from gvit.train.splat_align_step import AlignStep

    root, _ = stage1
    plain = PairedGaussians(root / "plain")
    assert plain.captions == [""] * 8 and plain.held_out is None
    cfg = load_config(None, ["model=splat_align", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"offline_train={root / 'plain'}", "stem_depth=1", "stem_tokens=8", "stem_width=32",
                             f"out={tmp_path / 'a'}"])
    step = AlignStep(cfg, 6, torch.device("cpu"))
    assert step.captions(["", "a small red star"], [2, 0], plain.classes) == [
        f"a {plain.classes[2]}",
        "a small red star",
    ]


def test_a_mirrored_set_renders_the_mirrored_image():
    g = torch.Generator().manual_seed(0)
    sets = Gaussians(torch.rand(2, 6, 2, generator=g) * 1.6 - 0.8, 0.05 + 0.2 * torch.rand(2, 6, 2, generator=g),
                     torch.rand(2, 6, generator=g) * 3, torch.rand(2, 6, 3, generator=g), torch.rand(2, 6, generator=g))
    flip = torch.tensor([True, False])
    out = render(mirror_sets(sets, flip), height=12, width=12)
    ref = render(sets, height=12, width=12)
    torch.testing.assert_close(out[0], ref[0].flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1])


def test_distillation_needs_a_clip_teacher_and_gaussians(stage1, tmp_path):
    root, _ = stage1
    quiet = dict(progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="needs offline_train"):
        train(load_config(None, ["model=splat_distill", f"out={tmp_path / 'a'}"]), **quiet)
    with pytest.raises(ValueError, match="needs teacher"):
        train(load_config(None, ["model=splat_distill", f"offline_train={root / 'train'}", f"out={tmp_path / 'b'}"]),
              **quiet)
    with pytest.raises(ValueError, match="must be a model=clip checkpoint or a CLIP folder"):
        train(load_config(None, ["model=splat_distill", f"offline_train={root / 'train'}",
                                 f"teacher={root / 'run' / 'checkpoint.pt'}", f"out={tmp_path / 'c'}"]), **quiet)


@pytest.mark.parametrize("align_text", [False, True])
def test_stage_two_trains_what_the_paper_trains_from_the_stage_one_student(stage1, tmp_path, align_text):
    root, _ = stage1
    cfg = load_config(None, ["model=splat_align", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"stage1={root / 'run' / 'checkpoint.pt'}", f"offline_train={root / 'train'}",
                             f"offline_eval={root / 'test'}", "steps=3", "batch_size=8", "stem_depth=1",
                             "stem_tokens=8", "stem_width=32", f"align_text={str(align_text).lower()}",
                             f"out={tmp_path / 'align'}"])
    result = train(cfg, progress=False, log=lambda *_: None)
    assert 0 <= result["top1_ratio"] and -1 <= result["cosine"] <= 1
    before = load_checkpoint(root / "run" / "checkpoint.pt")["student"]
    after = load_checkpoint(tmp_path / "align" / "checkpoint.pt")["student"]
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("stem.") for k in changed)
    # it started from the stage-1 student: 3 small steps away from it (a new stem would be far off)
    assert (after["stem.proj.weight"] - before["stem.proj.weight"]).abs().max() < 0.05
    assert any(k.startswith("clip.vision_model.encoder.layers.0.") for k in changed)
    assert "clip.visual_projection.weight" in changed
    assert not any(k.startswith(("clip.vision_model.encoder.layers.2.", "clip.vision_model.embeddings."))
                   for k in changed)
    text = {k for k in changed if k.startswith("clip.text")}
    if align_text:
        assert "clip.text_projection.weight" in text
        assert any(k.startswith("clip.text_model.encoder.layers.1.") for k in text)  # micro: 2 blocks, the last
        assert not any(k.startswith("clip.text_model.encoder.layers.0.") for k in text)
    else:
        assert text == set()


def test_a_stage_two_checkpoint_loads_without_its_stage_one_file(stage1, tmp_path):
    import shutil

    from gvit.train import load_trained

    root, _ = stage1
    shutil.copy(root / "run" / "checkpoint.pt", tmp_path / "stage1.pt")
    cfg = load_config(None, ["model=splat_align", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"stage1={tmp_path / 'stage1.pt'}", f"offline_train={root / 'train'}",
                             f"offline_eval={root / 'test'}", "steps=2", "batch_size=8", "stem_depth=1",
                             "stem_tokens=8", "stem_width=32", f"out={tmp_path / 'align'}"])
    result = train(cfg, progress=False, log=lambda *_: None)
    (tmp_path / "stage1.pt").unlink()
    again = load_trained(tmp_path / "align" / "checkpoint.pt").evaluate()
    assert again["cosine"] == pytest.approx(result["cosine"]) and again["top1"] == result["top1"]


def test_stage_two_refuses_a_stage_one_that_is_not_one(stage1, tmp_path):
    root, _ = stage1
    cfg = load_config(None, ["model=splat_align", f"teacher={root / 'teacher' / 'checkpoint.pt'}",
                             f"stage1={root / 'teacher' / 'checkpoint.pt'}", f"offline_train={root / 'train'}",
                             "steps=2", "batch_size=8", f"out={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="must be a model=splat_distill checkpoint"):
        train(cfg, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny random CLIP with a fast tokenizer and pixel statistics, saved as transformers saves a
    pretrained one (what a user would point teacher= at)."""
    import json

    import tokenizers
    import transformers

    from gvit.data.captions import CaptionedShapes
    from gvit.data.text import TextTokenizer

    folder = tmp_path_factory.mktemp("pretrained_clip")
    text = TextTokenizer.train(CaptionedShapes("train", n=200).captions, vocab_size=300).tokenizer
    text.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                                   special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=text, pad_token="[PAD]", bos_token="[BOS]",
                                         eos_token="[EOS]", unk_token="[UNK]").save_pretrained(folder)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=24, patch_size=4), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                 "image_std": [0.2, 0.25, 0.3]}))
    return folder


def test_a_pretrained_clip_folder_teaches_with_its_own_tokenizer_and_pixel_statistics(stage1, pretrained_dir,
                                                                                       tmp_path):
    import transformers

    from gvit.train.teacher import load_teacher

    teacher = load_teacher(str(pretrained_dir), "a {}", torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32)
    clip = transformers.CLIPModel.from_pretrained(pretrained_dir).eval()
    resized = torch.nn.functional.interpolate(images, size=(24, 24), mode="bicubic", align_corners=False,
                                              antialias=True).clamp(0, 1)
    pixels = (resized - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(teacher.image_embeddings(images), expected)
        ids, mask = teacher.encode_text(["a red star", "a small blue ring at the top"])
        assert ids.shape == (2, 16) and ids[0, 0] == 2 and ids[0, int(mask[0].sum()) - 1] == 3
        text = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        torch.testing.assert_close(teacher.text_embeddings(["a red star", "a small blue ring at the top"]), text)
    root, _ = stage1
    cfg = load_config(None, ["model=splat_distill", f"teacher={pretrained_dir}", f"offline_train={root / 'train'}",
                             f"offline_eval={root / 'test'}", "steps=2", "batch_size=8", "stem_depth=1",
                             "stem_tokens=8", "stem_width=32", "prompt=a {}", f"out={tmp_path / 'run'}"])
    result = train(cfg, progress=False, log=lambda *_: None)
    assert result["finished"] and -1 <= result["cosine"] <= 1 and 0 <= result["teacher_top1"] <= 1


def test_vl_eval_measures_stages_beside_the_teacher_against_compression_and_keeps_finished_rows(stage1, tmp_path):
    import json

    from gvit.cli import main
    from gvit.tools.vl_eval import vl_eval

    root, _ = stage1
    quiet = dict(progress=False, log=lambda *_: None)
    pruned = FitConfig(num_gaussians=16, iters=10, mode="sum", prune_tau=0.5, prune_at=0.5)
    fit_dataset("captioned-shapes", tmp_path / "pruned", pruned, split="test", limit=16, **quiet)
    fit_dataset("captioned-shapes", tmp_path / "alpha", FitConfig(num_gaussians=8, iters=2), split="test", limit=4,
                **quiet)
    ckpt = root / "run" / "checkpoint.pt"
    rows = vl_eval([ckpt], [root / "test", tmp_path / "pruned"], tmp_path / "vl", **quiet)["rows"]
    full, small = rows
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert small["pruned"] and not full["pruned"] and small["k"] == full["k"] == 16
    assert small["mean_count"] == manifest["mean_count"] < 16
    stored = sum(p.stat().st_size for p in (tmp_path / "pruned").glob("shard-*.safetensors"))
    assert small["compression"] == pytest.approx(3 * 32 * 32 * 16 / stored)  # measured file bytes, not a count
    assert full["bytes"] == pytest.approx(3 * 32 * 32 / full["compression"])
    assert full["top1_ratio"] == pytest.approx(full["top1"] / full["teacher_top1"])
    assert full["eval_images"] == 16 and 0 <= full["top1_held_out"] <= 1 and 0 <= full["teacher_knn"] <= 1
    assert full["i2t_r1"] <= full["i2t_r10"] and -1 <= full["cosine"] <= 1
    for name in ("vl_eval.json", "vl_eval.md", "vl_eval.csv", "vl_eval.png", "rows.jsonl"):
        assert (tmp_path / "vl" / name).is_file()
    assert "| test | 16 |" in (tmp_path / "vl" / "vl_eval.md").read_text()
    # a rerun keeps the finished rows (nothing is evaluated again)
    seen = []
    again = vl_eval([ckpt], [root / "test", tmp_path / "pruned"], tmp_path / "vl", progress=False, log=seen.append)
    assert again["rows"] == rows and len(seen) == 2 and all("kept" in line for line in seen)
    assert main(["vl-eval", "--checkpoint", str(ckpt), "--gaussians", str(root / "test"), "--limit", "4",
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert json.loads((tmp_path / "cli" / "vl_eval.json").read_text())["rows"][0]["eval_images"] == 4
    with pytest.raises(ValueError, match="2 checkpoints for 3 Gaussian folders"):
        vl_eval([ckpt, ckpt], [root / "test"] * 3, tmp_path / "x", **quiet)
    with pytest.raises(ValueError, match="needs a splat stage checkpoint"):
        vl_eval([root / "teacher" / "checkpoint.pt"], [root / "test"], tmp_path / "y", **quiet)
    with pytest.raises(ValueError, match="fitted in alpha mode"):
        vl_eval([ckpt], [tmp_path / "alpha"], tmp_path / "z", **quiet)
    with pytest.raises(ValueError, match="no manifest.json"):
        vl_eval([ckpt], [tmp_path], tmp_path / "w", **quiet)


def test_both_stages_train_with_augmentation_in_gaussian_space(stage1, tmp_path):
    import json

    root, _ = stage1
    quiet = dict(progress=False, log=lambda *_: None)
    aug = ["gaussian_crop_min=0.5", "token_drop=0.2", "color_jitter=0.2"]
    common = [f"teacher={root / 'teacher' / 'checkpoint.pt'}", f"offline_train={root / 'train'}",
              f"offline_eval={root / 'test'}", "batch_size=8", "stem_depth=1", "stem_tokens=8", "stem_width=32",
              "log_every=1"]
    distill = train(load_config(None, ["model=splat_distill", *common, "steps=4", *aug, f"out={tmp_path / 'd'}"]),
                    **quiet)
    assert distill["finished"] and -1 <= distill["cosine"] <= 1

    def losses(run, key):
        return [json.loads(line)[key] for line in open(run / "metrics.jsonl") if key in json.loads(line)]

    train(load_config(None, ["model=splat_distill", *common, "steps=4", f"out={tmp_path / 'p'}"]), **quiet)
    plain, augmented = losses(tmp_path / "p", "loss_distill"), losses(tmp_path / "d", "loss_distill")
    assert len(plain) == len(augmented) == 4 and plain[0] != augmented[0]  # the same weights, other inputs
    stage1_run = f"stage1={tmp_path / 'd' / 'checkpoint.pt'}"
    align = train(load_config(None, ["model=splat_align", *common, "steps=2", *aug, stage1_run,
                                     f"out={tmp_path / 'a'}"]), **quiet)
    assert align["finished"] and len(losses(tmp_path / "a", "loss_align")) == 2
