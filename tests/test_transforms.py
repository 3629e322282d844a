import torch

from gvit.data.transforms import crop_boxes, resized_crop


def test_whole_image_box_is_the_identity_and_pixel_aligned_boxes_are_slices():
    x = torch.rand(2, 3, 12, 16)
    full = torch.tensor([[0.0, 0.0, 16.0, 12.0]] * 2)
    assert torch.allclose(resized_crop(x, full, (12, 16)), x, atol=1e-6)
    box = torch.tensor([[4.0, 2.0, 8.0, 6.0], [0.0, 6.0, 8.0, 6.0]])  # x0, y0, w, h
    out = resized_crop(x, box, (6, 8))
    assert torch.allclose(out[0], x[0, :, 2:8, 4:12], atol=1e-6)
    assert torch.allclose(out[1], x[1, :, 6:12, 0:8], atol=1e-6)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    g = torch.Generator().manual_seed(0)
    b = crop_boxes(2000, 32, 48, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), generator=g)
    area = b[:, 2] * b[:, 3] / (32 * 48)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] + b[:, 2] <= 48 + 1e-9).all() and (b[:, 1] + b[:, 3] <= 32 + 1e-9).all()
    assert area.min() >= 0.5 * 0.99 and area.max() <= 1.0 + 1e-9 and area.std() > 0.05
    unclipped = (b[:, 2] < 48) & (b[:, 3] < 32)
    ratio = (b[:, 2] / b[:, 3])[unclipped]
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9


def test_seeded_crops_are_reproducible():
    x = torch.rand(64, 3, 8, 8)
    boxes = [crop_boxes(64, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    a, b, c = (resized_crop(x, box, (8, 8)) for box in boxes)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, c)


def _gaussians(b=2, k=40, seed=0, dtype=torch.float64):
    from gvit.gaussians import Gaussians

    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.rand(b, k, 2, generator=g, dtype=dtype) * 2 - 1,
                     torch.rand(b, k, 2, generator=g, dtype=dtype) * 0.2 + 0.02,
                     torch.rand(b, k, generator=g, dtype=dtype) * 6 - 3, torch.rand(b, k, 3, generator=g, dtype=dtype),
                     torch.rand(b, k, generator=g, dtype=dtype) * 0.8 + 0.2)


def test_rendering_cropped_gaussians_equals_the_crop_of_the_render():
    from gvit.data.transforms import crop_gaussians
    from gvit.render import render

    g = _gaussians()
    h, w = 12, 16
    # a crop of half the width and a quarter of the height (the aspect changes): render at (4h, 2w) and slice
    boxes = torch.tensor([[-0.5, -0.25, 0.5, 0.25], [0.0, -1.0, 1.0, -0.5]], dtype=torch.float64)
    big = render(g, height=4 * h, width=2 * w)
    rows = [(int(round((b[1] + 1) / 2 * 4 * h)), int(round((b[3] + 1) / 2 * 4 * h))) for b in boxes.tolist()]
    cols = [(int(round((b[0] + 1) / 2 * 2 * w)), int(round((b[2] + 1) / 2 * 2 * w))) for b in boxes.tolist()]
    expected = torch.stack([big[i, :, r0:r1, c0:c1] for i, ((r0, r1), (c0, c1)) in enumerate(zip(rows, cols))])
    got = render(crop_gaussians(g, boxes), height=h, width=w)
    assert expected.shape == got.shape and torch.allclose(got, expected, atol=1e-9)


def test_cropped_covariances_are_the_affine_map_of_the_originals():
    from gvit.data.transforms import crop_gaussians
    from gvit.gaussians import covariance

    g = _gaussians(seed=3)
    boxes = torch.tensor([[-0.9, -0.3, 0.1, 0.9], [-0.2, -0.6, 0.4, 0.2]], dtype=torch.float64)
    out = crop_gaussians(g, boxes)
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    d = torch.diag_embed(1 / half)[:, None]  # [B, 1, 2, 2]
    assert torch.allclose(covariance(out.scales, out.angles), d @ covariance(g.scales, g.angles) @ d, atol=1e-12)
    assert torch.allclose(out.means, (g.means - (boxes[:, None, :2] + boxes[:, None, 2:]) / 2) / half[:, None])
    assert (out.scales[..., 0] >= out.scales[..., 1]).all()


def test_gaussian_augmentation_is_seeded_keeps_a_gaussian_and_is_off_by_default():
    from gvit.data.transforms import augment_gaussians
    from gvit.gaussians import decode, encode

    raw = encode(_gaussians(b=4, k=30, dtype=torch.float32))
    same = augment_gaussians(raw, None, generator=torch.Generator())
    assert same[0] is raw and same[1] is None
    kw = dict(crop_scale_min=0.3, drop=0.3, color_jitter=0.2, noise=0.01)
    a = augment_gaussians(raw, None, generator=torch.Generator().manual_seed(5), **kw)
    b = augment_gaussians(raw, None, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].any(1).all()
    assert 0.3 < 1 - float(a[1].float().mean()) < 0.9  # crop and dropout both take Gaussians away
    kept = decode(a[0])
    assert torch.isfinite(a[0]).all() and (kept.colors >= 0).all() and (kept.colors <= 1).all()
    dropped = augment_gaussians(raw, torch.ones(4, 30, dtype=torch.bool), generator=torch.Generator(), drop=0.99)
    assert (dropped[1].sum(1) >= 1).all()  # no set is left empty
    jitter = augment_gaussians(raw, None, generator=torch.Generator().manual_seed(1), color_jitter=0.5)
    ratio = decode(jitter[0]).colors / decode(raw).colors
    assert jitter[1].all() and not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)


def test_paired_augmentation_crops_and_jitters_the_image_as_the_gaussians():
    from dataclasses import replace

    from gvit.data.transforms import augment_pairs, crop_gaussians, gaussian_crop_boxes
    from gvit.render import render

    g = _gaussians(b=3, k=30, seed=4)
    g = replace(g, scales=g.scales + 0.1, colors=g.colors * 0.7)  # smooth, and no colour clamped by the jitter
    size = 64
    images = render(g, height=size, width=size)
    out_images, out = augment_pairs(images, g, generator=torch.Generator().manual_seed(7), crop_scale_min=0.5,
                                    color_jitter=0.3)
    # the same draws, replayed: the crop boxes, then the colour factors
    gen = torch.Generator().manual_seed(7)
    boxes = gaussian_crop_boxes(3, scale=(0.5, 1.0), generator=gen).double()
    factor = 1 + 0.3 * (torch.rand(3, 1, 3, generator=gen) * 2 - 1).double()
    cropped = crop_gaussians(g, boxes)
    expected = render(replace(cropped, colors=cropped.colors * factor), height=size, width=size)
    assert (boxes[:, 2:] - boxes[:, :2]).prod(-1).min() < 3.5  # a real crop (the whole image is 4)
    assert out_images.shape == images.shape and (out_images - expected).abs().max() < 0.02
    assert not torch.allclose(out_images, images, atol=0.05)
    assert torch.allclose(out.colors, cropped.colors * factor)
    assert torch.equal(out.valid, (cropped.means.abs() < 1).all(-1))
    same_images, same = augment_pairs(images, g, generator=torch.Generator())
    assert same_images is images and same is g


def test_training_on_cached_and_saved_gaussians_with_augmentation(tmp_path):
    from gvit.fit import FitConfig
    from gvit.tools.fit_dataset import fit_dataset
    from gvit.train import make_config, train

    aug = dict(gaussian_crop_min=0.5, token_drop=0.2, color_jitter=0.1, gaussian_noise=0.01)
    cached = make_config(model="gvit", data="shapes:48", limit_eval=8, image_size=16, steps=4, batch_size=8,
                         encoder="refine", encoder_size="micro", classifier_size="micro", num_gaussians=8,
                         refine_features=8, cache_gaussians=True, crop_scale_min=1.0, classifier_from=0.25,
                         pretrain_until=1.0, guidance_from=1.0, token_neighbours=3, neighbour_layers=1,
                         out=str(tmp_path / "g"), **aug)
    assert 0 <= train(cached, progress=False)["top1"] <= 1
    from dataclasses import replace

    from gvit.train import load_checkpoint

    plain = replace(cached, gaussian_crop_min=1.0, token_drop=0.0, color_jitter=0.0, gaussian_noise=0.0,
                    out=str(tmp_path / "plain"))
    train(plain, progress=False)
    weights = [load_checkpoint(tmp_path / name / "checkpoint.pt")["classifier"] for name in ("g", "plain")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # the augmentation acted
    fit_dataset("shapes:48", tmp_path / "gs", FitConfig(num_gaussians=8, iters=2), split="train",
                progress=False, log=lambda *_: None)
    offline = make_config(model="offline", offline_train=str(tmp_path / "gs"), offline_eval=str(tmp_path / "gs"),
                          classifier_size="micro", num_gaussians=8, steps=2, batch_size=8, out=str(tmp_path / "o"),
                          **aug)
    assert 0 <= train(offline, progress=False)["top1"] <= 1


def test_live_classifier_steps_read_augmented_gaussians_and_the_reconstruction_does_not(monkeypatch):
    """Joint and live pre-training steps hand the classifier the augmented set (token dropout shows in
    its valid mask); the reconstruction loss and guidance steps read the encoder's Gaussians whole."""
    from gvit.models import GaussianClassifier
    from gvit.train import make_config
    from gvit.train.gvit_step import GViTStep

    seen = []
    forward = GaussianClassifier.forward

    def spy(self, g, valid=None, **kw):
        seen.append(None if valid is None else valid.clone())
        return forward(self, g, valid, **kw)

    monkeypatch.setattr(GaussianClassifier, "forward", spy)
    cfg = make_config(model="gvit", image_size=16, steps=6, batch_size=8, encoder="refine", encoder_size="micro",
                      classifier_size="micro", num_gaussians=16, refine_features=8, classifier_from=0.2,
                      pretrain_until=0.5, guidance_from=5, guidance_every=1, token_drop=0.5, device="cpu")
    run = GViTStep(cfg, 3, torch.device("cpu"))
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(3, (8,))
    phases = {}
    for step in range(6):
        seen.clear()
        assert run.step(step, images, labels, torch.Generator().manual_seed(step), 0, 1) is not None
        phases[run.schedule.at(step, 6).name] = list(seen)
    for name in ("classifier-pretrain", "joint"):
        (valid,), = [phases[name]]
        assert valid is not None and 0 < valid.float().mean() < 0.8  # about half the tokens dropped
    assert phases["encoder"] == [] and all(v is None for v in phases["guidance"])  # whole sets in guidance


def test_augmentation_is_off_in_runs_shorter_than_augment_min_epochs(tmp_path):
    """The classifier's epochs (its steps x batch / training images) gate the augmentation in Gaussian
    space: a shorter run trains exactly as with it off, records it off and says so; a longer one keeps it."""
    from dataclasses import replace

    from gvit.train import load_checkpoint, make_config, train
    from gvit.train.config import AUGMENTATION_OFF

    aug = dict(gaussian_crop_min=0.5, token_drop=0.2, color_jitter=0.1, gaussian_noise=0.01)
    cfg = make_config(model="gvit", data="shapes:48", limit_eval=8, image_size=16, steps=8, batch_size=8,
                      encoder="refine", encoder_size="micro", classifier_size="micro", num_gaussians=8,
                      refine_features=8, cache_gaussians=True, crop_scale_min=1.0, classifier_from=4,
                      pretrain_until=1.0, guidance_from=1.0, **aug)
    # 48 training images (no val split carved), 4 classifier steps of 8 images
    resolved, notes = cfg.for_training_set(48)
    assert resolved == cfg and notes == []  # augment_min_epochs 0: always on
    resolved, notes = replace(cfg, augment_min_epochs=0.6).for_training_set(48)  # 4 x 8 / 48 = 0.67 epochs
    assert resolved == replace(cfg, augment_min_epochs=0.6) and notes == []
    resolved, notes = replace(cfg, augment_min_epochs=0.7).for_training_set(48)
    assert not resolved.augments_gaussians() and resolved.augment_min_epochs == 0.7
    assert notes == ["augmentation in Gaussian space off (gaussian_crop_min, token_drop, color_jitter, "
                     "gaussian_noise): the classifier sees each training image 0.7 times, fewer than "
                     "augment_min_epochs=0.7"]
    lines = []
    gated = train(replace(cfg, augment_min_epochs=0.7, out=str(tmp_path / "gated")), progress=False, log=lines.append)
    plain = train(replace(cfg, **AUGMENTATION_OFF, augment_min_epochs=0.7, out=str(tmp_path / "plain")),
                  progress=False)
    assert any("augmentation in Gaussian space off" in line for line in lines)
    assert {k: v for k, v in gated.items() if k != "train_seconds"} == \
        {k: v for k, v in plain.items() if k != "train_seconds"}
    recorded = load_checkpoint(tmp_path / "gated" / "checkpoint.pt")["config"]
    assert recorded["token_drop"] == 0 and recorded["gaussian_crop_min"] == 1
