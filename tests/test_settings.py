import argparse
from dataclasses import dataclass

import pytest

from gvit.files import record_settings
from gvit.fit import FitConfig
from gvit.settings import add_arguments, coerce, from_arguments, from_mapping, load_settings, setting
from gvit.train import GViTConfig, load_config


@dataclass
class Toy:
    steps: int = setting(10, "how many")
    rate: float = setting(0.1, "how fast")
    flip: bool = setting(True, "mirror")
    mode: str = setting("a", "which", ("a", "b"))
    limit: int | None = setting(None, "optional")


@pytest.mark.parametrize("value, kind, expected", [
    ("1e-3", float, 1e-3), (3, float, 3.0), ("12", int, 12), ("4.0", int, 4), (5.0, int, 5), ("no", bool, False),
    ("True", bool, True), (True, bool, True), ("null", int | None, None), (None, float | None, None), (7, str, "7"),
])
def test_coerce_turns_strings_and_numbers_into_the_declared_type(value, kind, expected):
    out = coerce("key", value, kind)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, kind, message", [
    ("abc", int, "steps expects int, got 'abc'"), ("4.7", int, "expects int"), (4.7, int, "expects int"),
    (True, int, "expects int"), ("maybe", bool, "expects bool"), ("inf", float, "finite"), ("nan", float, "finite"),
    (None, int, "expects int"), ([1], str, "expects str"),
])
def test_coerce_names_the_key_and_refuses_what_does_not_fit(value, kind, message):
    with pytest.raises(ValueError, match=message):
        coerce("steps", value, kind)


def test_yaml_values_read_as_strings_are_coerced_and_bad_ones_name_key_and_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("base_lr: 1e-3\nsteps: 40\nhflip: no\nlimit_eval: null\n")
    cfg = load_config(good)
    assert cfg.base_lr == 1e-3 and cfg.steps == 40 and cfg.hflip is False and cfg.limit_eval is None
    for text, key in (("steps: abc\n", "steps"), ("steps: 4.7\n", "steps"), ("hflip: sometimes\n", "hflip"),
                      ("base_lr: .inf\n", "base_lr"), ("modle: gvit\n", "modle")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"{bad}.*{key}"):
            load_config(bad)
    with pytest.raises(ValueError, match="did you mean model"):
        load_config(None, ["modle=gvit"])
    with pytest.raises(ValueError, match="steps expects int"):
        GViTConfig(steps="abc")  # built in Python: the same checks


def test_one_declaration_serves_mapping_overrides_and_flags():
    assert from_mapping(Toy, {"steps": "3", "mode": "b"}) == Toy(steps=3, mode="b")
    assert load_settings(Toy, None, ["rate=2", "limit=none"]) == Toy(rate=2.0, limit=None)
    with pytest.raises(ValueError, match="mode must be one of a, b, got 'c'"):
        from_mapping(Toy, {"mode": "c"})
    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy, steps=99)
    assert from_arguments(Toy, parser.parse_args([])) == Toy(steps=99)
    assert from_arguments(Toy, parser.parse_args(["--rate", "1e-2", "--flip", "false"])) == Toy(
        steps=99, rate=0.01, flip=False
    )
    assert "how fast" in parser.format_help() and "(a, b)" in parser.format_help()
    with pytest.raises(ValueError, match=r"got 'my.yaml' \(a YAML file of settings goes after --config"):
        load_settings(Toy, None, ["my.yaml"])
    with pytest.raises(ValueError, match=r"expected key=value, got 'steps'$"):
        load_settings(Toy, None, ["steps"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "4.5"])


def test_fit_config_choices_come_from_the_declaration():
    with pytest.raises(ValueError, match="init must be one of random, grid, kmeans, superpixel"):
        FitConfig(init="spiral")
    assert FitConfig(iters="7").iters == 7


def test_record_settings_refuses_a_rerun_with_other_settings(tmp_path):
    path = tmp_path / "job" / "settings.json"
    record_settings(path, {"a": 1, "b": 2})
    record_settings(path, {"a": 1, "b": 2})  # same settings: fine
    with pytest.raises(ValueError, match=r"job holds work made with other settings \(b, c differ\)"):
        record_settings(path, {"a": 1, "b": 3, "c": 0})
