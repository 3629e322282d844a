"""bench/trials.py --share-prefix: continuing a shared run from the start of a stage (joint, classifier) gives what
training each row from scratch gives."""

import importlib.util
from pathlib import Path

import pytest

from gvit.train import make_config, train

SMALL = dict(data="shapes:64", limit_eval=16, encoder="refine", encoder_size="micro", classifier_size="micro",
             image_size=16, num_gaussians=16, batch_size=16, steps=12, classifier_from=0.25, pretrain_until=0.5,
             cache_gaussians=True, crop_scale_min=1.0, guidance_from=0.75, guidance_every=2, phase_lr=True,
             joint_lr=0.5, fit_steps=2, refine_features=8)


def _trials(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "bench" / "trials.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the bench scripts' shared helpers (_util)
    spec = importlib.util.spec_from_file_location("bench_trials", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_continued_from_a_shared_prefix_equal_runs_from_scratch(tmp_path, monkeypatch):
    trials = _trials(monkeypatch)
    branched_runs = []
    for i, tail in enumerate([dict(gamma=0.2), dict(guidance=False, lambda_cls=0.1)]):
        straight = train(make_config(**SMALL, **tail, out=str(tmp_path / f"straight{i}")), progress=False)
        branched = trials.train_from_shared_prefix(make_config(**SMALL, **tail, out=str(tmp_path / f"branch{i}")),
                                                   tmp_path / "prefix")
        branched_runs.append(branched)
        assert {k: v for k, v in branched.items() if k != "train_seconds"} == \
            {k: v for k, v in straight.items() if k != "train_seconds"}
    # a prefix interrupted before the joint stage (its checkpoint at step 2) is continued, not refused
    train(make_config(**SMALL, gamma=0.2, out=str(tmp_path / "interrupted-prefix")), stop_after=2, progress=False)
    resumed = trials.train_from_shared_prefix(make_config(**SMALL, gamma=0.2, out=str(tmp_path / "resumed")),
                                              tmp_path / "interrupted-prefix")
    assert {k: v for k, v in resumed.items() if k != "train_seconds"} == \
        {k: v for k, v in branched_runs[0].items() if k != "train_seconds"}
    with pytest.raises(ValueError, match="num_gaussians"):  # a key the steps before the joint stage read
        trials.train_from_shared_prefix(make_config(**{**SMALL, "num_gaussians": 8}, out=str(tmp_path / "other")),
                                        tmp_path / "prefix")


def test_rows_differing_in_gaussian_augmentation_share_the_steps_before_the_classifier_stage(tmp_path, monkeypatch):
    trials = _trials(monkeypatch)
    augmented = dict(gaussian_crop_min=0.5, token_drop=0.25, color_jitter=0.2, gaussian_noise=0.01, drop_path=0.3,
                     fit_steps=3)
    losses = []
    for i, row in enumerate([{}, augmented]):
        straight = train(make_config(**{**SMALL, **row}, out=str(tmp_path / f"straight{i}")), progress=False)
        branched = trials.train_from_shared_prefix(make_config(**{**SMALL, **row}, out=str(tmp_path / f"branch{i}")),
                                                   tmp_path / "prefix", "classifier")
        assert {k: v for k, v in branched.items() if k != "train_seconds"} == \
            {k: v for k, v in straight.items() if k != "train_seconds"}
        losses.append(branched["loss"])
    assert losses[0] != losses[1]  # the augmentation changed the run
    trials.train_from_shared_prefix(make_config(**SMALL, out=str(tmp_path / "joint-plain")),
                                    tmp_path / "joint-prefix", "joint")
    with pytest.raises(ValueError, match="gaussian_crop_min"):  # the classifier stage before the joint one reads it
        trials.train_from_shared_prefix(make_config(**{**SMALL, **augmented}, out=str(tmp_path / "joint-augmented")),
                                        tmp_path / "joint-prefix", "joint")


def test_joint_stage_bench_replays_the_run(tmp_path, monkeypatch):
    """bench/joint_stage.py: its replay of the joint stage as configured ends where training from
    scratch ends (same val top-1), and each variant starts from the untouched state."""
    path = Path(__file__).resolve().parents[1] / "bench" / "joint_stage.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the bench scripts' shared helpers (_util)
    spec = importlib.util.spec_from_file_location("bench_joint_stage", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = dict(SMALL, guidance=False, lambda_cls=0.1, val_every=4)
    straight = train(make_config(**settings, out=str(tmp_path / "straight")), progress=False)
    stage = bench.Stage(make_config(**settings, out=str(tmp_path / "prefix")))
    assert stage.variant("joint as configured")[0] == straight["val_top1"]
    assert stage.variant("joint as configured")[0] == straight["val_top1"]  # the state on disk was not changed
    top1, first, last = stage.variant("classifier, live Gaussians")
    assert 0 <= top1 <= 1 and first > 0 and last > 0
    own, _ = stage.reach(1.0)
    assert own < 0  # a step on a batch's class loss lowers it
