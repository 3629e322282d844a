import json
import os
import subprocess
import sys

import pytest
import torch

from gvit.cli import main
from gvit.train import as_kind, load_checkpoint, load_config, make_config, model_step, train

TINY = dict(data="shapes:96", limit_eval=48, encoder_size="micro", classifier_size="micro", image_size=16, patch=4,
            num_gaussians=12, batch_size=16, steps=12, log_every=2, checkpoint_every=100, classifier_from=0.25,
            pretrain_until=0.25, guidance_from=0.5, guidance_every=2)


def _weights(out):
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    return {f"{m}.{k}": v for m in ("encoder", "classifier") for k, v in state.get(m, {}).items()}


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    a = train(make_config(**TINY, out=str(tmp_path / "a")), progress=False)
    assert a["finished"] and 0 <= a["top1"] <= 1 and "psnr" in a
    cfg = make_config(**TINY, out=str(tmp_path / "b"))
    part = train(cfg, stop_after=5, progress=False)
    assert part == {"step": 5, "finished": False}
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 5
    b = train(cfg, resume=True, progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["top1"] == a["top1"]
    def log(run):
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in open(tmp_path / run / "metrics.jsonl")
        ]

    assert log("a") == log("b")  # same steps, phases and losses
    assert {"encoder", "joint", "guidance"} <= {row["phase"] for row in log("a")}
    with pytest.raises(ValueError, match="other settings.*gamma"):
        train(make_config(**(TINY | {"gamma": 0.05}), out=str(tmp_path / "b")), resume=True, progress=False)


def test_two_processes_match_one(tmp_path):
    overrides = [f"{k}={v}" for k, v in TINY.items()] + ["steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *overrides, f"out={one}", "--quiet"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gvit.cli",
           "train", *overrides, f"out={two}", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1, w2 = _weights(one), _weights(two)
    # same global batches, gradients averaged over the ranks: equal up to float rounding (Adam turns the
    # rounding noise of the key biases, whose true gradient is 0 under softmax, into steps of ~lr)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-4) for k in w1)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # really two different runs


@pytest.mark.parametrize("model", ["patch_vit", "offline"])
def test_baselines_train_and_evaluate(tmp_path, model, capsys):
    extra = {}
    if model == "offline":
        from gvit.tools.fit_dataset import fit_dataset
        from gvit.fit import FitConfig

        for split in ("train", "val"):  # Gaussians of the validation split: the result says so
            fit_dataset("shapes:64", tmp_path / split, FitConfig(num_gaussians=12, iters=20), split=split,
                        val_every=4, progress=False)
        extra = dict(offline_train=str(tmp_path / "train"), offline_eval=str(tmp_path / "val"))
    cfg = as_kind(make_config(**TINY), model, steps=6, out=str(tmp_path / "run"), **extra)
    result = train(cfg, progress=False)
    assert result["finished"] and result["eval_images"] > 0 and "psnr" not in result
    assert result["eval_split"] == ("val" if model == "offline" else "test")
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt")]) == 0
    out = capsys.readouterr().out
    assert f"{100 * result['top1']:.2f}%" in out and f"({result['eval_split']} split)" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "limit_eval=8"]) == 0
    out = capsys.readouterr().out  # the split is named through a limit too (an offline folder's own)
    assert f"({result['eval_split']} split)" in out and "on 8 images" in out


def test_nan_guard_skips_and_then_stops(tmp_path, monkeypatch):
    import gvit.train.gvit_step as T

    real = T.batch_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.reconstruction = out.reconstruction * float("nan")
        return out

    monkeypatch.setattr(T, "batch_losses", poisoned)
    with pytest.raises(FloatingPointError, match="NaN/inf.*gamma"):
        train(make_config(**(TINY | {"max_bad_steps": 3}), out=str(tmp_path / "r")), progress=False)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'gama'"):
        load_config(None, ["gama=0.1"])
    with pytest.raises(ValueError, match="gamma expects float"):
        load_config(None, ["gamma=lots"])
    with pytest.raises(ValueError, match="model must be one of gvit, patch_vit, offline"):
        load_config(None, ["model=resnet"])
    with pytest.raises(ValueError, match="patch must be >= 1 and divide image_size 30"):
        load_config(None, ["image_size=30", "patch=4"])
    with pytest.raises(ValueError, match="encoder_patch must be >= 1 and divide image_size 32, got 5"):
        load_config(None, ["encoder_patch=5"])
    with pytest.raises(ValueError, match="g0_layout must be one of uniform, stratified, grid"):
        load_config(None, ["g0_layout=hexagonal"])
    with pytest.raises(ValueError, match="sample_image"):
        load_config(None, ["sample_image=true", "learned_queries=true"])
    with pytest.raises(ValueError, match="image_colors"):
        load_config(None, ["image_colors=true", "learned_queries=true"])
    with pytest.raises(ValueError, match="offline_input must be one of gaussians, renders"):
        load_config(None, ["model=offline", "offline_train=x", "offline_input=pixels"])
    with pytest.raises(ValueError, match="guidance_from"):
        load_config(None, ["guidance_from=0.1"])
    with pytest.raises(ValueError, match="offline_train"):
        load_config(None, ["model=offline"])
    with pytest.raises(ValueError, match="cache_gaussians.*crop_scale_min=1, got 0.5"):
        load_config(None, ["cache_gaussians=true", "crop_scale_min=0.5"])
    with pytest.raises(ValueError, match="classifier_lr_scale must be > 0"):
        load_config(None, ["classifier_lr_scale=0"])
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match="c.yaml"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("steps: 7\nhflip: false\ngrad_clip: 1.0\n")
    cfg = load_config(good, ["steps=9", "grad_clip=none"])
    assert cfg.steps == 9 and cfg.hflip is False and cfg.grad_clip is None
    assert main(["train", "gama=1"]) == 2


def test_unreadable_checkpoint_is_refused(tmp_path):
    p = tmp_path / "ck.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ck.pt"):
        load_checkpoint(p)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"classifier": Evil(), "config": {}}, p)
    with pytest.raises(ValueError, match="ck.pt"):
        load_checkpoint(p)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(path)
        assert cfg.image_size % getattr(cfg, "patch", 1) == 0, path


def test_epochs_set_the_number_of_steps(tmp_path):
    cfg = as_kind(make_config(**TINY), "patch_vit", steps=1, epochs=0.5, out=str(tmp_path / "e"))
    result = train(cfg, progress=False)
    assert result["step"] == 3  # ceil(0.5 * 96 / 16)
    assert load_checkpoint(tmp_path / "e" / "checkpoint.pt")["config"]["steps"] == 3


def test_layer_decay_scales_follow_depth():
    from gvit.models import GaussianClassifier
    from gvit.train import param_groups

    model = GaussianClassifier(8, 3, "micro")  # depth 2
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["transformer.norm.weight"])] == 1.0
    assert scale[id(named["transformer.blocks.1.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["transformer.blocks.0.attn.qkv.weight"])] == 0.25
    assert scale[id(named["embed.weight"])] == scale[id(named["pos_embed"])] == 0.125
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["embed.weight"])] == 0.05 and decay[id(named["embed.bias"])] == 0.0


def test_finetune_freezes_the_encoder_and_trains_the_classifier(tmp_path, capsys):
    pre = tmp_path / "pre"
    train(make_config(**(TINY | {"steps": 4}), out=str(pre)), progress=False)
    overrides = [f"{k}={v}" for k, v in TINY.items()] + ["steps=4", "layer_decay=0.65", f"out={tmp_path / 'ft'}"]
    assert main(["finetune", "--checkpoint", str(pre / "checkpoint.pt"), *overrides, "--quiet"]) == 0
    a, b = load_checkpoint(pre / "checkpoint.pt"), load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])
    assert any(not torch.equal(a["classifier"][k], b["classifier"][k]) for k in a["classifier"])
    phases = {json.loads(line)["phase"] for line in open(tmp_path / "ft" / "metrics.jsonl")}
    assert phases == {"classifier-pretrain"}
    with pytest.raises(ValueError, match="finetune_from belongs to model=gvit, not to model=patch_vit"):
        load_config(None, ["model=patch_vit", "finetune_from=x.pt"])


def test_encoder_from_starts_the_encoder_of_another_run_and_a_new_classifier(tmp_path):
    pre = tmp_path / "pre"
    train(make_config(**(TINY | {"steps": 4}), out=str(pre)), progress=False)
    ckpt = str(pre / "checkpoint.pt")
    shared = TINY | {"steps": 6, "classifier_from": 0, "pretrain_until": 4, "guidance_from": 5, "encoder_from": ckpt}
    cfg = make_config(**shared, out=str(tmp_path / "b"))
    run = model_step(cfg, 4, "cpu")
    a = load_checkpoint(ckpt)
    run.load_pretrained(a, log=lambda *_: None)
    assert all(torch.equal(a["encoder"][k], v) for k, v in run.model.encoder.state_dict().items())
    fresh = model_step(cfg, 4, "cpu").model.classifier.state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in run.model.classifier.state_dict().items())  # not the checkpoint's
    assert train(cfg, progress=False)["finished"]
    phases = [json.loads(line)["phase"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert "encoder" not in phases and "classifier-pretrain" in phases  # no encoder phase of its own
    with pytest.raises(ValueError, match="encoder_from: the checkpoint's encoder is not the one these settings build"):
        bad = make_config(**(shared | {"num_gaussians": 16}), out=str(tmp_path / "c"))
        model_step(bad, 4, "cpu").load_pretrained(a)
    with pytest.raises(ValueError, match="finetune_from starts encoder and classifier, encoder_from the encoder"):
        make_config(**(shared | {"finetune_from": ckpt}))


def test_limits_take_images_spread_over_the_split():
    from gvit.data import spread_indices
    from gvit.train.data import limit

    assert spread_indices(10, 4) == [0, 2, 5, 7] and spread_indices(3, 5) == [0, 1, 2] and spread_indices(5, 0) == []
    with pytest.raises(ValueError):
        spread_indices(-1, 2)

    class Sorted(torch.utils.data.Dataset):  # stored class by class, like the CIFAR-10 ImageFolder zips
        classes = ["a", "b", "c"]

        def __len__(self):
            return 300

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), i // 100

    sub = limit(Sorted(), 30)
    assert len(sub) == 30 and sub.classes == ["a", "b", "c"]
    assert sorted(label for _, label in sub).count(1) == 10  # balanced, not the first class only


CACHED = TINY | dict(cache_gaussians=True, crop_scale_min=1.0, steps=16, classifier_from=0.25, pretrain_until=0.75,
                     guidance_from=0.875)


def test_cached_phase_resumes_exactly_and_its_cache_holds_the_encoders_gaussians(tmp_path):
    a = train(make_config(**CACHED, out=str(tmp_path / "a")), progress=False)
    cfg = make_config(**CACHED, out=str(tmp_path / "b"))
    train(cfg, stop_after=7, progress=False)  # stops inside the cached phase (steps 4-11)
    b = train(cfg, resume=True, progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and b["top1"] == a["top1"]
    phases = [json.loads(line)["phase"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert "joint" in phases and "guidance" in phases

    # the cache: the frozen encoder's Gaussians of every training image, in dataset order
    from gvit.train import model_step
    from gvit.train.data import image_collate, image_datasets

    cfg = make_config(**(CACHED | dict(encoder="denoise", learned_queries=True)), out=str(tmp_path / "c"))
    train_ds, _ = image_datasets(cfg)
    run = model_step(cfg, 6, "cpu")
    collate = image_collate(cfg.image_size)
    run.attach_training_set(train_ds, collate)
    raw, labels = run.encode_training_set()
    images, targets = collate([train_ds[i] for i in range(len(train_ds))])
    with torch.no_grad():
        expected = run.model.gaussians(images)
    assert raw.shape == (96, 12, 9) and torch.allclose(raw, expected, atol=1e-5)
    assert torch.equal(labels, targets)


def test_cached_steps_use_the_neighbourhoods_found_once_with_the_cache(tmp_path):
    from gvit.train import model_step, step_generator
    from gvit.train.data import image_collate, image_datasets

    cfg = make_config(**(CACHED | dict(token_features="splat", token_neighbours=3, neighbour_layers=1,
                                       neighbour_pool="edge")), out=str(tmp_path / "n"))
    train_ds, _ = image_datasets(cfg)
    run = model_step(cfg, 6, "cpu")
    assert run.model.classifier.local[0].pool == "edge"  # the setting reaches the layer
    run.attach_training_set(train_ds, image_collate(cfg.image_size))
    seen = []
    forward = run.model.classifier.forward
    run.model.classifier.forward = lambda g, valid=None, **kw: seen.append(kw) or forward(g, valid, **kw)
    labels = torch.zeros(16, dtype=torch.long)
    run.step(5, None, labels, step_generator(0, 5), 0, 1)  # a cached classifier step (steps 4-11)
    index, mask = run.cache_neighbourhoods
    expected = run.model.classifier.neighbourhoods(run.cache[0])
    assert torch.equal(index, expected[0]) and torch.equal(mask, expected[1]) and index.shape == (96, 12, 3)
    assert seen[0]["neighbourhoods"][0].shape == (16, 12, 3)
    run.step(12, torch.rand(16, 3, 16, 16), labels, step_generator(0, 12), 0, 1)  # the encoder trains again
    assert run.cache is None and run.cache_neighbourhoods is None


def test_classifier_lr_scale_sets_the_classifiers_rate_against_the_encoders(tmp_path):
    from gvit.train import model_step, step_generator

    cfg = make_config(**TINY, classifier_lr_scale=0.25, out=str(tmp_path / "r"))
    run = model_step(cfg, 6, "cpu")
    run.step(5, torch.rand(16, 3, 16, 16), torch.randint(0, 6, (16,)), step_generator(0, 5), 0, 1)
    enc, cls = (run.parts[name][1].param_groups[0]["lr"] for name in ("encoder", "classifier"))
    assert enc > 0 and cls == pytest.approx(0.25 * enc)


def test_patch_vit_with_stochastic_depth_resumes_exactly(tmp_path):
    settings = dict(data="shapes:64", limit_eval=16, classifier_size="micro", image_size=16, patch=4, batch_size=16,
                    steps=8, log_every=1, drop_path=0.3)
    a = train(make_config(model="patch_vit", **settings, out=str(tmp_path / "a")), progress=False)
    cfg = make_config(model="patch_vit", **settings, out=str(tmp_path / "b"))
    train(cfg, stop_after=3, progress=False)
    b = train(cfg, resume=True, progress=False)
    assert b["top1"] == a["top1"] and b["loss"] == a["loss"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = train(make_config(model="patch_vit", **{**settings, "drop_path": 0.0}, out=str(tmp_path / "c")),
                  progress=False)
    assert _weights(tmp_path / "c").keys() == wa.keys()
    assert not all(torch.equal(wa[k], _weights(tmp_path / "c")[k]) for k in wa)  # the drops changed the run
    assert plain["finished"]
    with pytest.raises(ValueError, match="drop_path"):
        make_config(model="patch_vit", **{**settings, "drop_path": 1.0}, out=str(tmp_path / "d"))
