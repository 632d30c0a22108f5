"""Atomic writes: an error never leaves a half-written file, or half a set of files, behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "replace_files", "write_json", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the file into place in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str))


def replace_files(
    directory: str | os.PathLike, names: Collection[str], write: Callable[[Path], None]
) -> Path:
    """Replace the files ``names`` in ``directory`` by what ``write`` makes, all or nothing.

    ``write(staging)`` writes the new files into a fresh sibling directory of ``directory``;
    only when it has returned are they moved in: each of ``names`` present in ``directory``
    is set aside, the new files are renamed into place, and what was set aside is deleted.
    So a failure in ``write`` leaves ``directory`` exactly as it was (or absent, if it was),
    and a failure while moving puts the old files back. Anything in ``directory`` not in
    ``names`` is never touched; ``names`` that ``write`` did not make are removed, so no file
    of an earlier run stays beside the new ones.

    Raises:
        NotADirectoryError: if ``directory`` exists and is not a directory.
        ValueError: if ``write`` made a file not in ``names``.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; choose another path")
    parent = out.resolve().parent  # beside the real directory: renames stay on its filesystem
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(staging)
        made = sorted(p.name for p in staging.iterdir())
        if unknown := set(made) - set(names):
            raise ValueError(f"replace_files: {sorted(unknown)} written but not among {names}")
        if not out.exists():
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
            try:
                os.rename(staging, out)
                return out
            except OSError:  # created meanwhile: replace file by file below
                pass
        _swap(staging, out, names, made)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _swap(staging: Path, out: Path, names: Collection[str], made: list[str]) -> None:
    """Set aside ``names`` in ``out`` (into ``staging``), move ``made`` in; undo on failure."""
    aside = Path(tempfile.mkdtemp(dir=staging, prefix=".old."))  # made is listed already
    set_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in names:
            if os.path.lexists(out / name):
                os.replace(out / name, aside / name)
                set_aside.append(name)
        for name in made:
            os.replace(staging / name, out / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            os.replace(out / name, staging / name)
        for name in set_aside:
            os.replace(aside / name, out / name)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
