import csv
import json

import pytest

from gvit.cli import main
from gvit.tools.sweep import _launch, chosen_on_val, grid_variants, parse_grid, run_sweep, variant_name

BASE = ["data=shapes:64", "limit_eval=32", "encoder_size=micro", "classifier_size=micro", "image_size=16", "patch=4",
        "batch_size=16", "steps=2", "log_every=1", "checkpoint_every=100"]


def test_grid_parsing_and_variants():
    grid = parse_grid(["num_gaussians=16,32", "guidance=false,true"])
    assert grid == {"num_gaussians": ["16", "32"], "guidance": ["false", "true"]}
    variants = grid_variants(grid)
    assert variants[0] == {"num_gaussians": "16", "guidance": "false"} and len(variants) == 4
    assert variant_name(variants[1]) == "num_gaussians-16__guidance-true"
    for bad, match in [(["k16"], "key=v1"), (["k=1,,2"], "non-empty"), (["k=1,1"], "distinct"),
                       (["k=1", "k=2"], "twice"), ([], "at least one")]:
        with pytest.raises(ValueError, match=match):
            parse_grid(bad)


def test_bad_values_fail_before_anything_runs(tmp_path):
    launched = []
    with pytest.raises(ValueError, match="pixel_loss.*l7"):
        run_sweep(None, {"pixel_loss": ["bce", "l7"]}, tmp_path / "s", overrides=BASE,
                  launch=lambda argv, n: launched.append(argv))
    with pytest.raises(ValueError, match="both a grid key and an override"):
        run_sweep(None, {"steps": ["1", "2"]}, tmp_path / "s", overrides=BASE, launch=lambda argv, n: None)
    assert launched == []


def test_killed_sweep_resumes_without_rerunning_finished_variants(tmp_path):
    out = tmp_path / "sweep"
    grid = {"model": ["patch_vit", "gvit"], "num_gaussians": ["4", "8"]}
    calls = []

    def killed_on_third(argv, nproc):
        calls.append(argv)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep is killed while the third variant trains
        _launch(argv, nproc)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(None, grid, out, overrides=BASE, launch=killed_on_third, log=lambda *a: None)
    finished = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert len(finished) == 2
    stamps = {name: (out / name / "result.json").stat().st_mtime_ns for name in finished}
    partial = json.loads((out / "results.json").read_text())
    assert sorted(r["variant"] for r in partial) == finished

    resumed = []

    def recording(argv, nproc):
        resumed.append(next(a for a in argv if a.startswith("out=")).split("/")[-1])
        _launch(argv, nproc)

    rows = run_sweep(None, grid, out, overrides=BASE, launch=recording, log=lambda *a: None)
    assert len(resumed) == 2 and not set(resumed) & set(finished)  # only the two unfinished variants ran
    assert {name: (out / name / "result.json").stat().st_mtime_ns for name in finished} == stamps
    assert len(rows) == 4 and all(0 <= r["top1"] <= 1 for r in rows)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [variant_name(v) for v in grid_variants(grid)]
    assert (out / "plot_num_gaussians.png").stat().st_size > 1000 and (out / "plot_model.png").is_file()
    assert "| model | num_gaussians | val top-1 (%) | top-1 (%) | split of top-1" in (out / "results.md").read_text()
    assert "nothing is chosen" in (out / "results.md").read_text()  # no run had a val split

    # a third run finds everything done and launches nothing; changed settings are refused
    run_sweep(None, grid, out, overrides=BASE, launch=lambda argv, n: pytest.fail("nothing should run"),
              log=lambda *a: None)
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_sweep(None, grid, out, overrides=BASE + ["seed=3"], launch=lambda argv, n: None, log=lambda *a: None)


def test_sweep_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sweep", "--grid", "guidance=false,true", "--out", str(out), *BASE, "num_gaussians=4"]) == 0
    assert "2 variant(s) finished" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [r["guidance"] for r in rows] == ["false", "true"] and all(r["psnr"] > 0 for r in rows)
    assert (out / "plot_guidance.png").is_file()
    assert main(["sweep", "--grid", "nosuchkey=1,2", "--out", str(tmp_path / "x"), *BASE]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_a_sweep_chooses_on_val(tmp_path):
    rows = run_sweep(None, {"base_lr": ["1e-4", "1e-2"]}, tmp_path / "s", overrides=[*BASE, "val_every=4", "steps=4"],
                     log=lambda *a: None)
    assert all(r["eval_split"] == "test" and 0 <= r["val_top1"] <= 1 for r in rows)  # each on both splits
    best = chosen_on_val(rows)
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    assert f"Chosen on val: {best['variant']}" in (tmp_path / "s" / "results.md").read_text()
    assert chosen_on_val([{"variant": "a", "val_top1": None, "top1": 0.9}]) is None  # test never chooses
