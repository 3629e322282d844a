"""model=clip: the contrastive loss against a direct float64 formulation, zero-shot and retrieval
measures on embeddings with known answers, and a run through the trainer (checkpoint with its text
tokenizer, reload, resume, learning on a fixed batch)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gvit.train import load_config, load_trained, train
from gvit.train.checkpoint import load_checkpoint
from gvit.train.clip_step import ClipStep, contrastive_loss
from gvit.train.embedding_eval import (knn_accuracy, linear_probe_accuracy, retrieval_recall, zero_shot_accuracy,
                                       zero_shot_measures)
from gvit.train.data import caption_collate, caption_datasets


def test_contrastive_loss_is_symmetric_infonce_with_shared_captions_as_positives():
    torch.manual_seed(0)
    image, text = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 2] = positives[2, 0] = True  # images 0 and 2 share a caption
    logits = 10.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = 0.0
    for rows in (logits, logits.T):
        for i in range(4):
            log_p = rows[i] - torch.logsumexp(rows[i], 0)
            matches = positives[i].nonzero().flatten()
            expected = expected - log_p[matches].mean() / 4
    torch.testing.assert_close(contrastive_loss(image, text, scale, positives), expected / 2)
    # the logit scale is capped at 100 as in CLIP
    big = contrastive_loss(image, text, torch.tensor(10.0, dtype=torch.float64), positives)
    torch.testing.assert_close(big, contrastive_loss(image, text, torch.tensor(math.log(100.0), dtype=torch.float64),
                                                     positives))


def test_zero_shot_and_retrieval_on_known_embeddings():
    classes = torch.eye(3)
    image = torch.tensor([[1.0, 0.1, 0], [0, 2.0, 0], [0.9, 1.0, 0], [0, 0, 1.0]])
    assert zero_shot_accuracy(image, classes, torch.tensor([0, 1, 0, 2])).tolist() == [1, 1, 0, 1]
    # a prompt ensemble: 2 templates per class, class-major; each class is the mean of its normalised
    # templates. Class 0's templates are e0 and 5 * e2 (normalised: e2), so its mean is (e0 + e2) / 2.
    ensemble = torch.stack([classes[0], 5 * classes[2], classes[1], classes[1], classes[2], classes[2]])
    probe = torch.tensor([[0.7, 0.0, 0.72], [0.0, 0.0, 1.0]])  # nearer (e0 + e2) / sqrt 2 than e2 alone
    assert zero_shot_accuracy(probe, ensemble, torch.tensor([0, 2]), templates=2).tolist() == [1, 1]
    assert zero_shot_accuracy(probe, ensemble[::2], torch.tensor([0, 2])).tolist() == [0, 1]  # first templates only
    with pytest.raises(ValueError, match="not 4 per class"):
        zero_shot_accuracy(probe, ensemble, torch.tensor([0, 2]), templates=4)
    captions = ["a", "b", "a", "c"]
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    r = retrieval_recall(image, text, captions, ks=(1, 2))
    # image 2 ([0.9, 1, 0]) retrieves text 1 ("b") first, then a text "a": a miss at 1, a hit at 2
    assert r["i2t_r1"] == 0.75 and r["i2t_r2"] == 1.0
    assert r["t2i_r1"] == 1.0  # every caption's best image carries that caption
    # a repeated caption is one text: image 0 ("a") ranks "b" first and "a" second, however often "b" repeats
    image = torch.tensor([[0.6, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    r = retrieval_recall(image, torch.eye(3)[[0, 1, 1]], ["a", "b", "b"], ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == 1.0
    assert r["t2i_r1"] == 1.0  # each distinct caption asked once: "a" finds image 0, "b" image 1


def test_zero_shot_on_unseen_classes_chooses_among_them_and_the_seen_among_theirs():
    classes = torch.eye(3)
    image = torch.tensor([[0.9, 0, 0.5],  # class 2, unseen: nearer class 0 among all, class 2 among the unseen
                          [0.4, 0, 0.9],  # class 0: nearer class 2 among all, class 0 among the seen (0, 1)
                          [0, 1.0, 0]])  # class 1
    targets = torch.tensor([2, 0, 1])
    m = zero_shot_measures(image, classes, targets, held_out=targets == 2, unseen=[2])
    assert m == {"top1": pytest.approx(1 / 3), "top1_held_out": 0.0, "top1_unseen": 1.0, "top1_seen": 1.0}
    assert zero_shot_accuracy(image, classes, targets, among=[1, 2]).tolist() == [1, 0, 1]
    assert set(zero_shot_measures(image, classes, targets)) == {"top1"}


def _cifar_names_folder(root, per_class=(6, 2)):
    """An image folder with CIFAR-10's class names (train/ and test/, a flat colour per class)."""
    from PIL import Image
    from gvit.data.captions import CLASS_ATTRIBUTES
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(CLASS_ATTRIBUTES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (25 * c, 10 * i, 200 - 20 * c)).save(root / split / name / f"{i}.png")
    return root


def test_unseen_classes_never_train_and_are_evaluated_zero_shot_by_their_descriptions(tmp_path):
    data = _cifar_names_folder(tmp_path / "data")
    cfg = load_config(None, ["model=clip", f"data={data}", "steps=4", "batch_size=8", "image_size=16", "patch=8",
                             "text_vocab=300", "captions=attributes", "unseen_classes=bird, cat,truck",
                             f"out={tmp_path / 'run'}"])
    train_ds, test_ds = caption_datasets(cfg)
    unseen = [train_ds.classes.index(name) for name in ("bird", "cat", "truck")]
    assert len(train_ds) == 7 * 6 and not any(t in unseen for t in train_ds.targets.tolist())
    assert any("antlers" in c for c in train_ds.captions)  # deer is seen, captioned by its attributes
    assert len(test_ds) == 20 and test_ds.held_out.sum() == 6 and sorted(test_ds.unseen) == sorted(unseen)
    assert test_ds.class_texts[unseen[0]] == "small flying animal with wings in the sky"
    result = train(cfg, progress=False, log=lambda *_: None)
    assert result["finished"] and result["eval_images"] == 20
    for key in ("top1", "top1_held_out", "top1_unseen", "top1_seen"):
        assert 0 <= result[key] <= 1
    with pytest.raises(ValueError, match="unseen_classes zebra not among the classes"):
        caption_datasets(load_config(None, ["model=clip", f"data={data}", "unseen_classes=zebra"]))
    with pytest.raises(ValueError, match="captions"):
        load_config(None, ["model=clip", "captions=words"])


def _cfg(tmp_path, *extra):
    return load_config(None, ["model=clip", "data=shapes:128", "steps=6", "batch_size=16", "log_every=2",
                              "checkpoint_every=3", "limit_eval=48", "text_vocab=300", "prompt=a {}",
                              f"out={tmp_path / 'run'}", *extra])


def test_a_clip_run_trains_evaluates_and_reloads(tmp_path):
    cfg = _cfg(tmp_path)
    result = train(cfg, progress=False, log=lambda *_: None)
    assert result["finished"] and result["eval_images"] == 48
    assert 0 <= result["top1"] <= 1 and 0 <= result["top1_held_out"] <= 1
    assert result["i2t_r1"] <= result["i2t_r5"] <= result["i2t_r10"] <= 1
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # weights_only: no code runs
    assert isinstance(state["text_tokenizer"], str)
    again = load_trained(tmp_path / "run" / "checkpoint.pt", ["device=cpu"]).evaluate()
    assert again["top1"] == result["top1"] and again["i2t_r5"] == result["i2t_r5"]


def test_resumed_clip_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    whole = train(_cfg(tmp_path / "a"), progress=False, log=lambda *_: None)
    cfg = _cfg(tmp_path / "b")
    assert not train(cfg, stop_after=3, progress=False, log=lambda *_: None)["finished"]
    resumed = train(cfg, resume=True, progress=False, log=lambda *_: None)
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")["clip"]
    b = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["clip"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["i2t_r1"] == whole["i2t_r1"]


def test_the_contrastive_loss_falls_on_a_fixed_batch(tmp_path):
    cfg = _cfg(tmp_path, "steps=40", "base_lr=4e-3", "warmup=0")
    train_ds, _ = caption_datasets(cfg)
    run = ClipStep(cfg, len(train_ds.classes), torch.device("cpu"))
    collate = caption_collate(cfg.image_size)
    run.attach_training_set(train_ds, collate)
    inputs, labels = collate([train_ds[i] for i in range(16)])
    losses = [run.step(s, inputs, labels, torch.Generator().manual_seed(s), 0, 1)["loss_clip"]
              for s in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_bad_clip_settings_are_refused():
    with pytest.raises(ValueError, match="prompt"):
        load_config(None, ["model=clip", "prompt=no slot"])
    with pytest.raises(ValueError, match="text_vocab"):
        load_config(None, ["model=clip", "text_vocab=100"])


def test_knn_votes_by_similarity_weighted_neighbours():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.7, 0.3]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), k=1) == 1.0  # nearest: 0, 2 or 3, 4
    # with k = 5 and a flat vote (huge temperature) the majority class 1 wins everywhere
    assert knn_accuracy(train, labels, test, torch.tensor([1, 1, 1]), k=5, temperature=1e6) == 1.0


def test_linear_probe_separates_separable_classes_and_not_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    labels = torch.arange(3).repeat(40)
    x = centres[labels] + torch.randn(120, 8, generator=g)
    assert linear_probe_accuracy(x[:90], labels[:90], x[90:], labels[90:]) == 1.0
    shuffled = labels[torch.randperm(120, generator=g)]  # no signal: near chance on held-out items
    assert linear_probe_accuracy(x[:90], shuffled[:90], x[90:], shuffled[90:]) < 0.7
