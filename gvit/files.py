"""Files gvit writes: atomically (each appears whole under its final name or not at all), and
settings records that refuse to mix two experiments in one folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_json", "settings_diff", "check_settings", "record_settings"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path`` (atomic on
    POSIX), on any error it is removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def settings_diff(saved: dict, current: dict) -> list[str]:
    """Sorted keys whose values differ between two settings mappings (a key missing on one side differs)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def check_settings(saved: dict, current: dict, where: str | os.PathLike, *, hint: str = "use another --out or remove it") -> None:
    """Refuse to continue work recorded with other settings: ValueError naming ``where`` and the keys."""
    diff = settings_diff(saved, current)
    if diff:
        raise ValueError(f"{where} holds work made with other settings ({', '.join(diff)} differ); {hint}")


def record_settings(path: str | os.PathLike, settings: dict, *, write: bool = True) -> None:
    """The one guard of every resumable job: when ``path`` (a JSON file) exists, its settings must
    equal ``settings`` (else ValueError naming the folder and the keys that differ); otherwise they
    are written there (when ``write``, e.g. on rank 0 only)."""
    path = Path(path)
    if path.is_file():
        check_settings(json.loads(path.read_text()), settings, path.parent)
    elif write:
        write_json(path, settings)
