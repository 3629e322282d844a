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
