"""One way to declare and read a job's settings (``FitConfig``, ``TrainConfig``).

A settings class is a dataclass whose fields are declared with :func:`setting`: the default, a
one-line help and, where the value is one of a few names, the allowed values, next to the field.
The same declaration then serves every source of values:

* :func:`from_mapping` (a YAML / JSON mapping, or values already typed),
* :func:`parse_overrides` (``key=value`` strings from a command line),
* :func:`add_arguments` / :func:`from_arguments` (one ``--key-name`` flag per field).

Every value passes :func:`coerce`, which turns strings into the field's type (``"1e-3"`` -> 0.001,
the way PyYAML reads ``base_lr: 1e-3``), rejects what does not fit (``4.7`` for an int, ``"maybe"``
for a bool, NaN or infinity for a float, a name not among the choices) and names the key in a
one-line ValueError. Range checks stay in each class's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path

__all__ = ["setting", "coerce", "typed_values", "from_mapping", "split_overrides", "parse_overrides",
           "apply_overrides", "read_settings_file", "load_settings", "add_arguments", "from_arguments",
           "validate_fields"]

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def setting(default, help: str, choices: typing.Iterable | None = None):
    """A dataclass field with its help and (optionally) allowed values."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices)}
    return dataclasses.field(default=default, metadata=meta)


def _split_optional(kind) -> tuple[type, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def coerce(key: str, value, kind, choices: tuple | None = None, *, where: str = "config"):
    """``value`` (a string or a native value) as the type ``kind`` (``int``, ``float``, ``bool``,
    ``str`` or ``X | None``); a value that does not fit raises ValueError naming ``key``."""
    base, optional = _split_optional(kind)

    def bad(expected: str):
        return ValueError(f"{where}: {key} expects {expected}, got {value!r}")

    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise bad(base.__name__)
    text = value.strip() if isinstance(value, str) else None
    if base is bool:
        if isinstance(value, bool):
            out = value
        elif text is not None and text.lower() in _TRUE + _FALSE:
            out = text.lower() in _TRUE
        else:
            raise bad("bool (true or false)")
    elif base is int:
        if isinstance(value, bool):
            raise bad("int")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif text is not None:
            try:
                out = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise bad("int") from None
                if not number.is_integer():
                    raise bad("int") from None
                out = int(number)
        else:
            raise bad("int")
    elif base is float:
        if isinstance(value, bool):
            raise bad("float")
        try:
            out = float(text if text is not None else value)
        except (TypeError, ValueError):
            raise bad("float") from None
        if not math.isfinite(out):
            raise bad("a finite float")
    elif base is str:
        if isinstance(value, (dict, list, tuple, set)):
            raise bad("str")
        out = str(value)
    else:  # pragma: no cover - a settings class declared a type this module does not know
        raise TypeError(f"{where}: {key} has an unsupported type {kind!r}")
    if choices is not None and out not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return out


def _fields(cls) -> dict[str, tuple[object, tuple | None]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("choices")) for f in dataclasses.fields(cls)}


def typed_values(cls, values: dict, where: str = "config") -> dict:
    """``values`` (key -> string or native value) typed as the fields of ``cls``; an unknown key
    raises ValueError naming it, the near keys and the allowed ones."""
    known = _fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        import difflib

        names = ", ".join(repr(k) for k in unknown)
        near = [m for k in unknown for m in difflib.get_close_matches(k, list(known), n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"{where}: unknown key {names}{hint}; keys are {', '.join(known)}")
    return {k: coerce(k, v, *known[k], where=where) for k, v in values.items()}


def from_mapping(cls, values: dict, *, where: str = "config"):
    """An instance of ``cls`` from a mapping of key -> value (strings or native values)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of key: value, got {type(values).__name__}")
    return cls(**typed_values(cls, values, where))


def split_overrides(items: typing.Iterable[str], *, where: str = "config") -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: "value"}`` (untyped)."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            hint = " (a YAML file of settings goes after --config)" if item.endswith((".yaml", ".yml")) else ""
            raise ValueError(f"{where}: expected key=value, got {item!r}{hint}")
        values[key.strip()] = text
    return values


def parse_overrides(cls, items: typing.Iterable[str], *, where: str = "config") -> dict:
    """``["key=value", ...]`` -> ``{key: typed value}`` for the fields of ``cls``."""
    return typed_values(cls, split_overrides(items, where=where), where)


def apply_overrides(obj, items: typing.Iterable[str] | None, *, where: str = "config"):
    """``obj`` with ``key=value`` overrides applied (parsed and checked as on the command line)."""
    values = parse_overrides(type(obj), items or [], where=where)
    return dataclasses.replace(obj, **values) if values else obj


def read_settings_file(path: str | os.PathLike) -> dict:
    """The ``key: value`` mapping of a YAML (or JSON) file, untyped."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ValueError(f"config file {p}: not valid YAML ({problem})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"config file {p}: expected a mapping of key: value")
    return loaded or {}


def load_settings(cls, path: str | os.PathLike | None = None, overrides: typing.Iterable[str] | None = None):
    """``cls`` from a YAML (or JSON) file and ``key=value`` overrides on top."""
    values = typed_values(cls, read_settings_file(path), f"config file {Path(path)}") if path is not None else {}
    return cls(**(values | parse_overrides(cls, overrides or [])))


def add_arguments(parser: argparse.ArgumentParser, cls, *, title: str | None = None, **defaults) -> None:
    """One ``--key-name`` option per field of ``cls`` (help, allowed values and defaults from the
    declaration; ``defaults`` replace some of them for this command)."""
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        kind, choices = _fields(cls)[f.name]
        default = defaults.get(f.name, f.default)

        def parse(text: str, key=f.name, kind=kind, choices=choices):
            try:
                return coerce(key, text, kind, choices, where="option")
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc).removeprefix("option: ")) from None

        parse.__name__ = f.name
        allowed = f" ({', '.join(map(str, choices))})" if choices else ""
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=parse, default=default,
                           metavar=f.name.upper() if not choices else "{" + ",".join(map(str, choices)) + "}",
                           help=f"{f.metadata.get('help', f.name)}{allowed} (default {default})")


def from_arguments(cls, namespace: argparse.Namespace):
    """An instance of ``cls`` from the options :func:`add_arguments` added."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def validate_fields(obj, *, where: str = "config") -> None:
    """Check (and coerce in place) every field of a settings dataclass instance, so one built
    directly in Python gets the same type and choice checks as one read from a file."""
    for key, (kind, choices) in _fields(type(obj)).items():
        object.__setattr__(obj, key, coerce(key, getattr(obj, key), kind, choices, where=where))
