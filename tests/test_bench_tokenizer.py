"""bench/tokenizer.py's table comes from one commit: the code version it records, and the refusals."""

import importlib.util
import subprocess
from pathlib import Path

import pytest


def _bench(monkeypatch, name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the bench scripts' shared helpers (_util)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_code_version_is_the_commit_and_flags_changes_to_code(tmp_path, monkeypatch):
    util = _bench(monkeypatch, "_util")
    (tmp_path / "gvit").mkdir()
    (tmp_path / "gvit" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("notes\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    commit = _git(tmp_path, "rev-parse", "HEAD")
    assert util.code_version(tmp_path) == commit
    (tmp_path / "notes.md").write_text("other notes\n")  # outside gvit/, bench/, configs/
    (tmp_path / "gvit" / "new.py").write_text("y = 2\n")  # untracked
    assert util.code_version(tmp_path) == commit
    (tmp_path / "gvit" / "a.py").write_text("x = 2\n")
    assert util.code_version(tmp_path) == commit + "+changes"


def test_the_table_refuses_runs_of_another_commit_and_uncommitted_code(tmp_path, monkeypatch):
    bench = _bench(monkeypatch, "tokenizer")
    runs = tmp_path / "table"
    monkeypatch.setattr(bench, "code_version", lambda root: "a" * 40)
    assert bench.pin_code(runs, any_code=False) == "a" * 40
    assert (runs / "code.txt").read_text().strip() == "a" * 40
    assert bench.pin_code(runs, any_code=False) == "a" * 40  # the same commit continues the table
    monkeypatch.setattr(bench, "code_version", lambda root: "b" * 40)
    with pytest.raises(SystemExit, match=f"{runs} holds runs of commit a+, this checkout is b+"):
        bench.pin_code(runs, any_code=False)
    assert bench.pin_code(runs, any_code=True) == "b" * 40  # a quick look may mix
    assert (runs / "code.txt").read_text().strip() == "a" * 40  # and leaves the record alone
    monkeypatch.setattr(bench, "code_version", lambda root: "a" * 40 + "+changes")
    with pytest.raises(SystemExit, match="commit the changes"):
        bench.pin_code(tmp_path / "fresh", any_code=False)
    assert not (tmp_path / "fresh").exists()
