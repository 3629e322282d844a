"""Settings per model kind and the one registry of kinds: a run records only the core and its own
kind's keys, a key of another kind is a one-line error naming the kinds it belongs to, configs and
checkpoints from before the split still load, and no module outside the registry asks for a kind
by its name."""

import json

import pytest
import torch

from gvit.cli import main
from gvit.train import (KINDS, MODELS, TrainConfig, as_kind, config_from_dict, kind_of, load_checkpoint, load_config,
                        load_trained, make_config, train)
from gvit.train.config import KEYS_BEFORE_THE_SPLIT

CORE = set(f for f in TrainConfig.__dataclass_fields__)


def test_the_registry_is_the_one_list_of_kinds():
    assert MODELS == tuple(KINDS) == ("gvit", "patch_vit", "offline", "tokenizer", "clip", "splat_distill",
                                      "splat_align")
    files = set()
    for name, kind in KINDS.items():
        assert kind.settings.kind == name and kind_of(name) is kind
        assert CORE <= set(kind.settings.keys())  # every kind extends the core
        files.add(kind.__module__)
    assert len(files) == len(KINDS)  # each kind's step in a file of its own
    with pytest.raises(ValueError, match="model must be one of gvit, patch_vit"):
        kind_of("resnet")
    with pytest.raises(TypeError, match="make_config"):
        TrainConfig()


def test_each_kind_has_only_its_own_keys_and_old_keys_all_have_a_home():
    patch_vit, gvit = set(KINDS["patch_vit"].settings.keys()), set(KINDS["gvit"].settings.keys())
    assert patch_vit - CORE == {"patch", "classifier_size", "pool", "classifier_lr_scale", "layer_decay",
                                 "drop_path"}
    assert "num_gaussians" in gvit and "num_gaussians" not in patch_vit and "gamma" not in patch_vit
    assert not {"tokenizer", "prompt", "teacher", "offline_train"} & gvit
    tokenizer = set(KINDS["tokenizer"].settings.keys())
    assert {"perceptual_from", "lambda_perc", "pixel_loss"} <= tokenizer and "gamma" not in tokenizer
    assert KEYS_BEFORE_THE_SPLIT <= set().union(*(kind.settings.keys() for kind in KINDS.values()))


def test_a_key_of_another_kind_is_a_one_line_error_naming_its_kinds(tmp_path):
    for make in (lambda: load_config(None, ["model=patch_vit", "num_gaussians=8"]),
                 lambda: make_config(model="patch_vit", num_gaussians=8)):
        with pytest.raises(ValueError, match=r"^config: num_gaussians belongs to model=gvit / offline, not to "
                                             r"model=patch_vit$"):
            make()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tokenizer\ngamma: 0.2\n")
    with pytest.raises(ValueError, match=r"r\.yaml: gamma belongs to model=gvit, not to model=tokenizer"):
        load_config(recipe)
    gvit_recipe = tmp_path / "g.yaml"
    gvit_recipe.write_text("num_gaussians: 32\nclassifier_size: micro\n")
    with pytest.raises(ValueError, match="num_gaussians belongs to model=gvit / offline.*--as-model patch_vit"):
        load_config(gvit_recipe, ["model=patch_vit"])  # the old spelling of a baseline: named with the new one
    assert load_config(gvit_recipe, as_model="patch_vit").classifier_size == "micro"
    with pytest.raises(ValueError, match="unknown key 'gama'.*did you mean gamma"):
        load_config(None, ["gama=0.1"])  # a key no kind has: named with the near ones
    # a baseline from a GViT recipe keeps the keys it shares
    base = load_config(None, ["num_gaussians=8", "classifier_size=micro"])
    pv = as_kind(base, "patch_vit", out="x")
    assert pv.model == "patch_vit" and pv.classifier_size == "micro" and "num_gaussians" not in pv.to_dict()
    assert load_config(None, ["classifier_size=micro"], as_model="patch_vit").classifier_size == "micro"
    with pytest.raises(ValueError, match="gamma belongs to model=gvit"):
        load_config(None, ["gamma=0.2"], as_model="patch_vit")


def test_a_run_records_only_the_core_and_its_own_keys(tmp_path, capsys):
    cfg = make_config(model="patch_vit", data="shapes:32", limit_eval=8, image_size=16, steps=2, batch_size=8,
                      classifier_size="micro", out=str(tmp_path / "pv"))
    train(cfg, progress=False)
    recorded = load_checkpoint(tmp_path / "pv" / "checkpoint.pt")["config"]
    assert set(recorded) == set(KINDS["patch_vit"].settings.keys()) == set(cfg.to_dict())
    # an override of another kind's key on a loaded run is refused the same way
    with pytest.raises(ValueError, match="num_gaussians belongs to model=gvit / offline"):
        load_trained(tmp_path / "pv" / "checkpoint.pt", ["num_gaussians=4"])
    assert main(["train", "model=patch_vit", "num_gaussians=4", f"out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_gaussians belongs to model=gvit / offline, not to model=patch_vit" in err


def test_a_checkpoint_from_before_the_split_still_loads(tmp_path):
    cfg = make_config(model="patch_vit", data="shapes:32", limit_eval=8, image_size=16, steps=1, batch_size=8,
                      classifier_size="micro", out=str(tmp_path / "pv"))
    train(cfg, progress=False)
    path = tmp_path / "pv" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    # the flat record of that time: every kind's keys, at their defaults where the kind did not have them
    flat = {"encoder": "denoise", "num_gaussians": 64, "gamma": 0.1, "tokenizer": "gaussian", "prompt": "a {}",
            "teacher": None, "precision": "bf16"}
    state["config"] = {**state["config"], **flat}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    trained = load_trained(old)
    assert trained.cfg.to_dict() == {**cfg.to_dict(), "precision": "bf16"}
    assert trained.evaluate()["eval_images"] == 8
    assert config_from_dict({"model": "gvit", "steps": 3, "prompt": "a {}"}).steps == 3
    with pytest.raises(ValueError, match="old.pt config: unknown key 'from_the_future'"):
        config_from_dict({**state["config"], "from_the_future": 1}, where=str(old))


def test_old_flat_configs_keep_working(tmp_path):
    recipe = tmp_path / "flat.yaml"
    recipe.write_text("data: shapes:64\nnum_gaussians: 16\ngamma: 0.05\nclassifier_from: 0.2\npatch: 4\n")
    cfg = load_config(recipe, ["steps=7"])
    assert cfg.model == "gvit" and cfg.num_gaussians == 16 and cfg.gamma == 0.05 and cfg.steps == 7
    assert cfg.schedule().classifier_from == 0.2


def test_tools_ask_a_kind_for_capabilities():
    assert [n for n, k in KINDS.items() if k.makes_gaussians] == ["gvit"]
    assert [n for n, k in KINDS.items() if k.tokenizes] == ["tokenizer"]
    assert [n for n, k in KINDS.items() if k.text_tower] == ["clip"]
    assert [n for n, k in KINDS.items() if k.splat_student] == ["splat_distill", "splat_align"]
    assert [n for n, k in KINDS.items() if not k.reads_images] == ["offline"]
    assert KINDS["gvit"].describe({"top1": 0.5, "eval_images": 4, "psnr": 20.0}) == \
        "top-1 50.00% on 4 images, PSNR 20.00 dB"
    line = KINDS["tokenizer"].describe({"psnr": 20.0, "ssim": 0.5, "eval_images": 4, "usage": 1.0, "perplexity": 9.0,
                                        "bits_per_image": 64})
    assert line.startswith("PSNR 20.00 dB, SSIM 0.5000 on 4 images, codebook usage 100.0%")


def test_the_recorded_settings_of_a_kind_round_trip_through_json(tmp_path):
    for name in MODELS:
        extra = {"offline_train": "x"} if "offline_train" in KINDS[name].settings.keys() else {}
        cfg = make_config(model=name, **extra)
        again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and type(again) is KINDS[name].settings
