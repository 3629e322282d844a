"""Images with text: captioned shapes (held-out pairs, words that match the pixels), class prompts,
caption files and their errors, and the offline BPE text tokenizer."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gvit.data import ShapesDataset, open_dataset
from gvit.data.captions import (CLASS_ATTRIBUTES, COLOR_NAMES, HELD_OUT_PAIRS, AttributeCaptions, CaptionedShapes,
                                CaptionFile, ClassCaptions, color_names, describe_class, describe_shapes)
from gvit.data.shapes import SHAPE_CLASSES, make_shapes
from gvit.data.text import BOS_ID, EOS_ID, PAD_ID, TextTokenizer


def test_colour_names_are_the_nearest_cube_corner():
    assert color_names(torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.6, 0.7, 0.9], [0.1, 0.6, 0.4]])) == \
        ["red", "blue", "white", "green"]
    assert len(set(COLOR_NAMES)) == 8


def test_train_split_never_shows_a_held_out_pair_and_test_marks_them():
    train, test = CaptionedShapes("train", n=400), CaptionedShapes("test", n=400)
    pairs = lambda d: [(SHAPE_CLASSES[t], c.split()[2]) for t, c in zip(d.targets.tolist(), d.captions)]  # noqa: E731
    assert len(train) == 400 and not any(p in HELD_OUT_PAIRS for p in pairs(train))
    marked = [p in HELD_OUT_PAIRS for p in pairs(test)]
    assert marked == test.held_out.tolist() and 0.05 < sum(marked) / len(marked) < 0.25
    image, label = train[0]  # items are (image, label), as every dataset's; the caption is captions[i]
    assert image.shape == (3, 32, 32) and label == int(train.targets[0]) and train.labels is train.targets
    opened = open_dataset("captioned-shapes:50", "test")
    assert isinstance(opened, CaptionedShapes) and opened.captions == test.captions[:50]
    with pytest.raises(ValueError, match="captioned-shapes:N"):
        open_dataset("captioned-shapes:x")
    assert CaptionedShapes("train", n=50).captions == train.captions[:50]  # deterministic


def test_caption_words_describe_the_pixels():
    images, labels, masks, attrs = make_shapes(200, seed=5, attributes=True)
    assert torch.equal(make_shapes(200, seed=5)[0], images)  # asking for attributes changes no image
    captions, colors = describe_shapes(labels, attrs)
    inside = torch.stack([images[i][:, masks[i]].mean(1) for i in range(200)])
    assert colors == color_names(inside)  # the colour word names the shape's pixels
    coords = (2 * torch.arange(32) + 1) / 32 - 1
    centroid_x = torch.stack([coords[masks[i].nonzero()[:, 1]].float().mean() for i in range(200)])
    area = masks.flatten(1).float().mean(1)
    words = [c.split() for c in captions]
    assert all(w[3] == SHAPE_CLASSES[t] for w, t in zip(words, labels.tolist()))
    small = torch.tensor([w[1] == "small" for w in words])
    same_shape = labels == labels[0]
    assert area[small & same_shape].max() < area[~small & same_shape].min()  # small / large by area
    left = torch.tensor(["left" in c for c in captions])
    right = torch.tensor(["right" in c for c in captions])
    assert centroid_x[left].max() < 0 < centroid_x[right].min()


def test_a_prompt_may_be_an_ensemble_of_templates():
    from gvit.data.captions import class_prompt, class_prompts, prompt_templates
    from gvit.train import load_config

    assert prompt_templates("a {} | a small {}") == ["a {}", "a small {}"]
    assert class_prompt("a {} | a small {}", "pickup_truck") == "a pickup truck"  # captions use the first
    assert class_prompts("a {}|one {}", ["cat", "dog"]) == ["a cat", "one cat", "a dog", "one dog"]
    with pytest.raises(ValueError, match="every |-separated template.*'a small'"):
        prompt_templates("a {} | a small")
    with pytest.raises(ValueError, match="config: prompt must hold"):
        load_config(None, ["model=clip", "prompt=a {} | no slot"])


def test_a_mirrored_caption_swaps_left_and_right_only():
    from gvit.data.captions import mirror_caption

    assert mirror_caption("a small red star at the top left") == "a small red star at the top right"
    assert mirror_caption("a large blue ring on the right") == "a large blue ring on the left"
    assert mirror_caption("a star in the middle") == "a star in the middle"
    assert mirror_caption("bright lefty") == "bright lefty"


def test_class_prompts_caption_a_labelled_dataset():
    data = ClassCaptions(ShapesDataset("test", n=10), "a picture of a {}")
    assert data.captions[3] == f"a picture of a {SHAPE_CLASSES[int(data.targets[3])]}"
    assert data[3][1] == int(data.labels[3]) and data[3][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="prompt"):
        ClassCaptions(ShapesDataset("test", n=2), "no slot")
    from gvit.data import Subset  # a carved split of a dataset read from files is a subset: labels through it
    part = ClassCaptions(Subset(ShapesDataset("test", n=10), [1, 3, 5]), "a {}")
    assert part.targets.tolist() == ShapesDataset("test", n=10).targets[[1, 3, 5]].tolist()


class _Labelled:
    """A labelled dataset of the given class names (no images needed to caption it)."""

    def __init__(self, classes, labels):
        self.classes, self.labels = list(classes), torch.tensor(labels)

    def __len__(self):
        return len(self.labels)


def test_attribute_captions_are_random_parts_of_the_class_description():
    classes = list(CLASS_ATTRIBUTES)
    labels = [i % 10 for i in range(200)]
    data = AttributeCaptions(_Labelled(classes, labels), "a photo of a {}.")
    assert data.class_texts[classes.index("cat")] == "small furry animal with four legs in a house"
    assert data.class_texts[classes.index("ship")] == "large machine in the water"
    for caption, label in zip(data.captions, labels):
        noun, adjectives, parts, place = CLASS_ATTRIBUTES[classes[label]]
        words = set(caption.removeprefix("a photo of a ").removesuffix(".").split())
        allowed = {noun, "with", "and", *" ".join(adjectives + parts).split(), *place.split()}
        assert noun in words and words <= allowed, caption
    assert len(set(data.captions)) > 40  # varied, not one caption per class
    full = [c for c, t in zip(data.captions, labels) if c == f"a photo of a {data.class_texts[t]}."]
    assert 0 < len(full) < len(labels) // 2
    assert AttributeCaptions(_Labelled(classes, labels), "a photo of a {}.").captions == data.captions  # seeded
    assert describe_class(CLASS_ATTRIBUTES["deer"], [False, True, True, False, False]) == \
        "brown animal with four legs"
    with pytest.raises(ValueError, match="no attributes for the classes tiger"):
        AttributeCaptions(_Labelled(["cat", "tiger"], [0, 1]))


@pytest.mark.parametrize("unseen", ["bird", "cat", "truck"])
def test_a_built_in_held_out_class_is_described_in_words_the_other_classes_use(unseen):
    taught = {w for c, e in CLASS_ATTRIBUTES.items() if c not in ("bird", "cat", "truck")
              for w in describe_class(e).split()}
    assert set(describe_class(CLASS_ATTRIBUTES[unseen]).split()) <= taught


def _image(path, value=100):
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)


def test_caption_files_read_jsonl_and_tsv(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", 0)
    _image(tmp_path / "img" / "b.png", 255)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "img/a.png", "caption": "a dark square"}) + "\n\n"
                                          + json.dumps({"image": "img/b.png", "caption": "light"}) + "\n")
    (tmp_path / "pairs.tsv").write_text("img/b.png\tlight\n")
    data = CaptionFile(tmp_path / "pairs.jsonl")
    assert len(data) == 2 and data.captions == ["a dark square", "light"] and data.targets.tolist() == [-1, -1]
    image, label = data[1]
    assert image.shape == (3, 8, 10) and float(image.min()) == 1.0 and label == -1
    assert CaptionFile(tmp_path / "pairs.tsv").captions == ["light"]


@pytest.mark.parametrize("name, text, match", [
    ("bad.jsonl", '{"image": "a.png", "caption": "x"}\n{oops\n', r"bad.jsonl:2: not JSON"),
    ("keys.jsonl", '{"file": "a.png"}\n', r"keys.jsonl:1: expected"),
    ("gone.jsonl", '{"image": "missing.png", "caption": "x"}\n', r"gone.jsonl:1: image .*missing.png not found"),
    ("notab.tsv", "a.png caption\n", r"notab.tsv:1: expected path<TAB>caption"),
    ("empty.tsv", "a.png\t \n", r"empty.tsv:1: empty caption"),
    ("none.tsv", "\n", r"none.tsv: no image-caption pairs"),
    ("pairs.csv", "a.png,x\n", r"pairs.csv: a caption file is .jsonl or .tsv"),
])
def test_bad_caption_files_name_the_file_and_line(tmp_path, name, text, match):
    _image(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        CaptionFile(tmp_path / name)


def test_text_tokenizer_encodes_pads_saves_and_loads(tmp_path):
    captions = CaptionedShapes("train", n=300).captions
    tokenizer = TextTokenizer.train(captions, vocab_size=400)
    assert tokenizer.vocab_size <= 400
    ids, mask = tokenizer.encode(["a small red star at the top", "A Small Red Star"], 16)
    assert ids.shape == (2, 16) and ids[:, 0].tolist() == [BOS_ID, BOS_ID]
    ends = mask.sum(1) - 1
    assert ids[0, ends[0]] == EOS_ID and ids[1, ends[1]] == EOS_ID and (ids[1, ends[1] + 1:] == PAD_ID).all()
    assert tokenizer.decode(ids) == ["a small red star at the top", "a small red star"]  # lower-cased
    short, _ = tokenizer.encode(["a small red star at the top"], 4)
    assert short[0, 0] == BOS_ID and short[0, -1] == EOS_ID  # cut to fit, [EOS] kept
    tokenizer.save(tmp_path / "text.json")
    again = TextTokenizer.load(tmp_path / "text.json")
    assert torch.equal(again.encode(captions[:5], 16)[0], tokenizer.encode(captions[:5], 16)[0])
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="bad.json: not a text tokenizer file"):
        TextTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="length"):
        tokenizer.encode(["x"], 2)
