"""A disk cache of latency measurements, one JSON file per entry, safe under concurrency.

Building a latency table is the slow part of a prune, and identical layers recur across models
and runs, so every measurement is cached under a key that names everything that changes the
figure: the op (kind, kernel, stride, groups…), shapes, batch, dtype and the backend identity.

Layout: ``<dir>/<sha256 of canonical key JSON>.json`` holding ``{"key", "value",
"value_sha256"}``. Writes go to a temporary file in the same directory and are moved into place
with ``os.replace`` (atomic on POSIX and Windows), so a reader sees either no entry or a whole
one, and two processes writing the same entry at once simply leave the last complete write.
Anything unreadable — truncated, garbage, wrong checksum, or a different key under the same name
— is a miss: the cache never raises on bad entries, it measures again and overwrites them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "LatencyCache", "default_cache_dir", "key_digest"]

#: Environment variable that overrides the cache directory.
ENV_VAR = "FXPRUNE_CACHE_DIR"

_FORMAT = 1
_ENTRY = re.compile(r"^[0-9a-f]{64}\.json$")
_TMP_SUFFIX = ".tmp"


def default_cache_dir() -> Path:
    """``$FXPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxprune/latency``, else ``~/.cache/…``."""
    if env := os.environ.get(ENV_VAR):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fxprune" / "latency"


def _canonical(obj: Any) -> str:
    # sort_keys + fixed separators: equal dicts give equal bytes whatever their insertion order;
    # tuples serialise as lists, so a key built with either compares equal.
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_digest(key: Mapping[str, Any]) -> str:
    """The entry name of ``key``: sha256 of its canonical JSON."""
    return _sha256(_canonical(dict(key)))


class LatencyCache:
    """Measurements on disk, keyed by a JSON-serialisable dict.

    Args:
        path: cache directory; ``None`` means :func:`default_cache_dir`. Created on demand.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"LatencyCache({str(self.path)!r})"

    def _entry(self, key: Mapping[str, Any]) -> Path:
        return self.path / f"{key_digest(key)}.json"

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The cached value for ``key``, or ``None`` (also for a damaged entry, which is removed)."""
        entry = self._entry(key)
        try:
            text = entry.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            self._discard(entry)
            return None
        value = _decode(text, _canonical(dict(key)))
        if value is None:
            self._discard(entry)
        return value

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key`` atomically (last complete write wins)."""
        value = dict(value)
        record = {
            "format": _FORMAT,
            "key": dict(key),
            "value": value,
            "value_sha256": _sha256(_canonical(value)),
        }
        payload = _canonical(record)  # also rejects non-JSON keys/values before touching disk
        self.path.mkdir(parents=True, exist_ok=True)
        entry = self._entry(key)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{entry.stem[:16]}.", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
            os.replace(tmp, entry)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get_or_measure(
        self,
        key: Mapping[str, Any],
        fn: Callable[[], Mapping[str, Any]],
        *,
        accept: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The cached value for ``key``; on a miss, ``fn()`` is measured, stored and returned.

        Args:
            accept: a cached value it rejects counts as a miss and is re-measured — e.g.
                ``lambda v: v["stable"]``, so a figure taken on a busy machine is retried on
                the next run instead of living in the cache forever.

        A failure to write the cache (disk full, read-only directory) warns instead of
        throwing away a measurement that may have taken minutes.
        """
        cached = self.get(key)
        if cached is not None and (accept is None or accept(cached)):
            return cached
        value = dict(fn())
        try:
            self.put(key, value)
        except OSError as e:
            warnings.warn(
                f"latency cache {self.path} not updated: {e}", RuntimeWarning, stacklevel=2
            )
        return value

    def __len__(self) -> int:
        """Number of entry files (damaged ones included until they are next read)."""
        return sum(1 for _ in self._entries())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, Mapping) and self.get(key) is not None

    def clear(self) -> None:
        """Remove every entry and any temporary file a killed writer left behind."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if _ENTRY.match(p.name) or (p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX)):
                self._discard(p)

    def _entries(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if _ENTRY.match(p.name)]

    @staticmethod
    def _discard(entry: Path) -> None:
        # Racing with a writer that just replaced the file costs at most one re-measurement.
        with contextlib.suppress(OSError):
            entry.unlink()


def _decode(text: str, canonical_key: str) -> dict[str, Any] | None:
    """The value of an entry file's text, or ``None`` if anything about it is off."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        return None
    value = record.get("value")
    if not isinstance(value, dict) or "key" not in record:
        return None
    try:
        if _canonical(record["key"]) != canonical_key:
            return None  # a hash collision or a hand-edited file
        if _sha256(_canonical(value)) != record.get("value_sha256"):
            return None
    except (TypeError, ValueError):
        return None
    return value
