"""Files gvit writes: atomically (each appears whole under its final name or not at all), safetensors
files read back without running code (:func:`read_safetensors`), settings
records that refuse to mix two experiments in one folder, and output folders that know what they
hold (:func:`output_folder`: a marker naming the job and its settings, and a lock while it writes).

A write that fails for want of space or permission raises :class:`WriteError`, a one-line ValueError
naming the file and its folder (what finished before stays). Text files are valid UTF-8 whatever the file
names they hold: a byte of a name that is not text (Python's surrogate escape ``\\udcNN``) is written as
the six characters ``\\udcNN``, and :func:`original_name` turns such text back into the name."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["WriteError", "write_fault", "original_name", "append_line", "atomic_path", "write_text", "readable_text",
           "write_json", "write_safetensors", "read_safetensors", "settings_diff", "check_settings", "record_settings",
           "check_output", "output_folder", "remove_temporaries", "MARKER", "LOCK"]


class WriteError(ValueError):
    """A file could not be written (no space, no permission, a read-only disk): one line naming it."""


_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}


def write_fault(exc: BaseException, path: str | os.PathLike) -> WriteError | None:
    """The :class:`WriteError` an OSError writing ``path`` stands for (None for other errors)."""
    if isinstance(exc, OSError) and exc.errno in _FAULTS:
        path = Path(path)
        return WriteError(f"cannot write {readable_text(path.name)} in {readable_text(str(path.parent))}: "
                          f"{_FAULTS[exc.errno]} (finished outputs are kept; free space or fix the permissions "
                          f"and rerun to resume)")
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path`` (atomic on
    POSIX), on any error it is removed. Creates the parent folder. Running out of space or
    permission raises :class:`WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise (write_fault(exc, path) or exc) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files (and some writers recreate them): the usual ones
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        fault = write_fault(exc, path)
        if fault is not None:
            raise fault from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically as valid UTF-8 (the bytes of a file name that are not text
    as ``\\udcNN``; :func:`original_name`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", errors="backslashreplace")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to a log file (valid UTF-8, as :func:`write_text`); a full disk or a
    missing permission raises :class:`WriteError`."""
    try:
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise (write_fault(exc, path) or exc) from None


_ESCAPED = re.compile(r"\\udc([89a-fA-F][0-9a-fA-F])")


def original_name(text: str) -> str:
    """A name as :func:`write_text` wrote it, back as Python holds it (``\\udcNN`` -> the surrogate escape
    of byte NN, so ``os.fsencode`` gives the name's bytes)."""
    return _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def readable_text(text: str) -> str:
    """``text`` as valid Unicode for places that accept nothing else (file metadata, terminals):
    the undecodable bytes of a file name become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, *, file_format: str, version: str,
                      metadata: dict | None = None) -> None:
    """Write ``tensors`` to a safetensors file atomically, its metadata ``format``, ``version`` and
    ``metadata`` as text (values that are not strings as JSON; keys and values made valid UTF-8, which
    safetensors needs): the writing twin of :func:`read_safetensors`."""
    from safetensors.torch import save_file

    meta = {"format": file_format, "version": version}
    for key, value in (metadata or {}).items():
        meta[readable_text(str(key))] = readable_text(value if isinstance(value, str) else json.dumps(value))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_safetensors(path: str | os.PathLike, *, file_format: str | tuple[str, ...], what: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file whose metadata says ``format: file_format`` (or one of them)
    (reading runs no code); FileNotFoundError or a ValueError naming the file otherwise. ``what``
    names the kind of file in messages ("Gaussian file", "token file")."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        if str(path) == readable_text(str(path)):
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        else:  # safetensors opens only paths that are valid text: read the bytes here
            data = path.read_bytes()
            tensors, meta = load(data), _safetensors_metadata(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{readable_text(str(path))}: not a readable safetensors file ({exc})") from None
    if meta.get("format") not in ((file_format,) if isinstance(file_format, str) else file_format):
        raise ValueError(f"{path}: not a gvit {what} (format={meta.get('format')!r})")
    return tensors, meta


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte little-endian header length,
    then the JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return dict(header.get("__metadata__") or {})


def settings_diff(saved: dict, current: dict) -> list[str]:
    """Sorted keys whose values differ between two settings mappings (a key missing on one side differs)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def check_settings(saved: dict, current: dict, where: str | os.PathLike, *,
                   hint: str = "use another --out or remove it") -> None:
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


MARKER = ".gvit.json"  # what job wrote the folder, with which settings
LOCK = ".gvit.lock"  # held while a job writes the folder


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(holder: dict | None) -> bool:
    """Whether the process that wrote a lock still runs (unknown hosts count as alive)."""
    if not holder or holder.get("host") != socket.gethostname():
        return holder is not None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def _acquire(lock: Path, job: str) -> None:
    record = json.dumps({"job": job, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if _alive(holder):
                who = (f"gvit {holder.get('job')} (pid {holder.get('pid')} on {holder.get('host')})" if holder
                       else "another process")
                raise ValueError(f"{lock.parent} is being written by {who}; wait for it, or remove {lock} if no "
                                 f"such process runs") from None
            lock.unlink(missing_ok=True)  # left by a killed process
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return
    raise ValueError(f"{lock.parent}: could not take the lock {lock}")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_path` left under ``folder`` (not in
    sub-folders another process holds); returns them."""
    root, removed = Path(folder), []
    for tmp in root.rglob(".*.tmp"):
        held = any((p / LOCK).exists() for p in tmp.parents if root in p.parents)  # a sub-folder's own writer
        if tmp.is_file() and not held:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def check_output(out: str | os.PathLike, inputs=(), *, what: str = "--out") -> Path:
    """Refuse an output folder that is an input, lies inside an input folder, or holds an input
    (outputs would overwrite or be read back as inputs), or that exists as a file."""
    out = Path(out)
    where = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if _inside(where, src) or _inside(src, where):
            relation = "is" if where == src else ("lies inside" if _inside(where, src) else "holds")
            raise ValueError(f"{what} {out} {relation} the input {item}; write the outputs to another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, job: str, *, settings: dict | None = None, inputs=(), resume: bool = False,
                  overwrite: bool = False, continues: bool = False, what: str = "--out"):
    """Claim the folder ``out`` for ``job`` while the block runs.

    Refused with a ValueError naming the folder, before anything is written: an ``out`` that
    overlaps ``inputs`` (:func:`check_output`); a folder another process is writing (its lock names
    it); a folder holding files gvit did not write, or another job's outputs (unless
    ``overwrite``); one holding this job's outputs made with other ``settings`` (unless
    ``overwrite``); one holding this job's outputs at all, unless ``resume``, ``overwrite``, or
    the job ``continues`` its own work by design (idempotent jobs such as fitting files, which
    skip what is done). Inside, the folder's lock is held and the temporary files of killed runs are gone.
    A job that another job of this process runs inside the folder that one holds (the demo's report)
    writes as part of it: no checks, no marker of its own.
    """
    holder = _holder(Path(out) / LOCK) if (Path(out) / LOCK).is_file() else None
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        yield Path(out)  # a job run by the job that holds this folder writes as part of it
        return
    out = check_output(out, inputs, what=what)
    settings = None if settings is None else json.loads(json.dumps(settings, default=str))  # as the marker holds them
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {out}: the folder is not writable")
    lock = out / LOCK
    _acquire(lock, job)
    try:
        remove_temporaries(out)  # left by killed runs; no one else writes here while the lock is held
        marker = out / MARKER
        try:
            saved = json.loads(marker.read_text()) if marker.is_file() else None
        except ValueError:
            if overwrite:
                saved = {"job": None}
            else:
                raise ValueError(f"{what} {out}: {marker.name} is unreadable; pass --overwrite to claim the "
                                 f"folder again") from None
        if saved is None:
            others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
            if others and not overwrite:
                raise ValueError(f"{what} {out} holds files gvit did not write ({', '.join(others[:3])}"
                                 f"{', ...' if len(others) > 3 else ''}); choose a new folder or pass --overwrite")
        elif saved.get("job") != job and not overwrite:
            raise ValueError(f"{what} {out} holds the outputs of gvit {saved.get('job')}; choose another folder "
                             f"or pass --overwrite")
        elif saved.get("job") == job and not overwrite:
            if settings is not None:
                check_settings(saved.get("settings") or {}, settings, out,
                               hint="pass --overwrite to replace that work, or choose another folder")
            if not (resume or continues):
                raise ValueError(f"{what} {out} holds a gvit {job} run; pass --resume to continue it or --overwrite "
                                 f"to start again")
        write_json(marker, {"job": job, "settings": settings})
        try:
            yield out
        except BaseException:
            if saved is None and {p.name for p in out.iterdir()} <= {MARKER, LOCK}:  # failed before writing
                marker.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
                if created:
                    out.rmdir()
            raise
    finally:
        lock.unlink(missing_ok=True)
