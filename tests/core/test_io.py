"""``replace_files``: a set of files replaced all at once or not at all, nothing else touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fxprune.core.io
from fxprune.core.io import replace_files

NAMES = ("a.txt", "b.txt", "c.txt")


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): p.read_text() for p in directory.rglob("*") if p.is_file()
    }


def _writer(version: str, names=("a.txt", "b.txt")):
    def write(staging: Path) -> None:
        for name in names:
            (staging / name).write_text(f"{name} {version}")

    return write


def _existing(tmp_path: Path) -> Path:
    out = replace_files(tmp_path / "run", NAMES, _writer("old", NAMES))
    (out / "mine.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "a.txt").write_text("nested, not ours")
    return out


def test_fresh_directory(tmp_path):
    out = replace_files(tmp_path / "deep" / "run", NAMES, _writer("new"))
    assert _snapshot(out) == {"a.txt": "a.txt new", "b.txt": "b.txt new"}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["run"]
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()


def test_replaces_ours_removes_stale_keeps_the_rest(tmp_path):
    out = _existing(tmp_path)
    replace_files(out, NAMES, _writer("new"))
    assert _snapshot(out) == {
        "a.txt": "a.txt new",
        "b.txt": "b.txt new",  # c.txt: ours, not written this time, so gone
        "mine.txt": "mine",
        "sub/a.txt": "nested, not ours",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_write_changes_nothing(tmp_path):
    out = _existing(tmp_path)
    before = _snapshot(out)

    def write(staging: Path) -> None:
        _writer("new")(staging)
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        replace_files(out, NAMES, write)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(RuntimeError):
        replace_files(tmp_path / "new", NAMES, write)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("failing_call", range(5))  # 3 set aside, then 2 moved in
def test_failed_move_puts_everything_back(tmp_path, monkeypatch, failing_call):
    out = _existing(tmp_path)
    before = _snapshot(out)
    calls = []
    replace = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == failing_call + 1:
            raise OSError("device went away")
        replace(src, dst)

    monkeypatch.setattr(fxprune.core.io.os, "replace", flaky)
    with pytest.raises(OSError, match="device went away"):
        replace_files(out, NAMES, _writer("new"))
    monkeypatch.setattr(fxprune.core.io.os, "replace", replace)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_unlisted_file_is_an_error(tmp_path):
    out = _existing(tmp_path)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"d\.txt"):
        replace_files(out, NAMES, _writer("new", ("a.txt", "d.txt")))
    assert _snapshot(out) == before


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        replace_files(tmp_path / "run", NAMES, _writer("new"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
