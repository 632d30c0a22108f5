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

Latency figures (:meth:`LatencyCache.get_measurement`) are also checked against the
:class:`~fxprune.backends.Measurement` schema and plausible ranges (every field present with its
type, times finite, positive and under an hour): a readable entry that fails is a miss too,
logged with its file. An unstable figure (``stable=False``) is stored with the number of
measurements taken so far and measured again on each later lookup, keeping the quieter figure,
until ``tries`` measurements have been made; then it is used, with a warning each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fxprune.backends.base import Measurement
from fxprune.core.errors import FxpruneError

__all__ = [
    "ENV_VAR",
    "MAX_MS",
    "UNSTABLE_TRIES",
    "LatencyCache",
    "default_cache_dir",
    "key_digest",
    "measurement_problem",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache directory.
ENV_VAR = "FXPRUNE_CACHE_DIR"

_FORMAT = 1
_ENTRY = re.compile(r"^[0-9a-f]{64}\.json$")
_TMP_SUFFIX = ".tmp"

#: Longest plausible figure (ms): an hour. Anything longer in the cache is damage, not a latency.
MAX_MS = 3_600_000.0
#: Measurements of an unstable figure (counting the first) before the quietest one is used.
UNSTABLE_TRIES = 3


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
        record = self._read(key)
        return None if record is None else record["value"]

    def _read(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The whole record of ``key``'s entry, or ``None`` (a damaged entry is removed)."""
        entry = self._entry(key)
        try:
            text = entry.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            self._discard(entry)
            return None
        record = _decode(text, _canonical(dict(key)))
        if record is None:
            self._discard(entry)
        return record

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key`` atomically (last complete write wins)."""
        self._write(key, value)

    def _write(self, key: Mapping[str, Any], value: Mapping[str, Any], **extra: Any) -> None:
        """Write an entry; ``extra`` fields go into the record beside the value."""
        value = dict(value)
        record = {
            "format": _FORMAT,
            "key": dict(key),
            "value": value,
            "value_sha256": _sha256(_canonical(value)),
            **extra,
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
        self._store(key, value)
        return value

    def get_measurement(
        self,
        key: Mapping[str, Any],
        measure: Callable[[], Measurement],
        *,
        tries: int = UNSTABLE_TRIES,
    ) -> Measurement:
        """The cached latency figure for ``key``; measured by ``measure()`` when there is none.

        An entry that is not a plausible :class:`Measurement` (:func:`measurement_problem`) is a
        miss, logged with its file, and overwritten. An unstable entry is measured again, and
        the quieter of the two figures stored, until ``tries`` measurements have been made; the
        quietest is then used with a logged warning.

        Raises:
            FxpruneError: ``measure()`` itself returned an implausible figure (a backend fault:
                it is not stored).
        """
        if tries < 1:
            raise ValueError(f"tries must be at least 1, got {tries}")
        entry = self._entry(key)
        record = self._read(key)
        cached: Measurement | None = None
        done = 0
        if record is not None:
            problem = measurement_problem(record["value"])
            if problem is not None:
                logger.warning(
                    "latency cache entry %s (%s) is not a plausible measurement: %s; measuring "
                    "again",
                    entry,
                    _describe(key),
                    problem,
                )
            else:
                cached = Measurement.from_dict(record["value"])
                done = _tries(record)
                if cached.stable:
                    return cached
                if done >= tries:
                    logger.warning(
                        "latency cache entry %s (%s) stayed unstable over %d measurements "
                        "(relative spread %.3g); using its median %.4g ms. Quiet the machine and "
                        "clear the cache to measure it again.",
                        entry,
                        _describe(key),
                        done,
                        cached.rel_spread,
                        cached.median_ms,
                    )
                    return cached
                logger.info(
                    "latency cache entry %s (%s) is unstable (relative spread %.3g); measuring "
                    "again (%d of %d)",
                    entry,
                    _describe(key),
                    cached.rel_spread,
                    done + 1,
                    tries,
                )
        fresh = measure()
        problem = measurement_problem(fresh.to_dict())
        if problem is not None:
            raise FxpruneError(
                f"Backend {fresh.backend_id} returned an implausible latency figure for "
                f"{_describe(key)}: {problem}. It was not cached; this is a fault of the backend "
                "(or of its clock)."
            )
        best = fresh
        if cached is not None and not fresh.stable and cached.rel_spread < fresh.rel_spread:
            best = cached  # both unstable: keep the quieter figure
        self._store(key, best.to_dict(), tries=done + 1)
        return best

    def _store(self, key: Mapping[str, Any], value: Mapping[str, Any], **extra: Any) -> None:
        # A failure to write the cache (disk full, read-only directory) warns instead of
        # throwing away a measurement that may have taken minutes.
        try:
            self._write(key, value, **extra)
        except OSError as e:
            warnings.warn(
                f"latency cache {self.path} not updated: {e}", RuntimeWarning, stacklevel=3
            )

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
    """The record in an entry file's text, or ``None`` if anything about it is off."""
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
    return record


def _tries(record: Mapping[str, Any]) -> int:
    """Measurements behind an entry (entries written before the count was kept: one)."""
    n = record.get("tries", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def _describe(key: Mapping[str, Any]) -> str:
    """A key's small fields, to say which figure an entry holds (the backend is left out)."""
    parts = [f"{k}={v}" for k, v in key.items() if k != "backend" and len(str(v)) <= 60]
    text = ", ".join(parts)
    return f"key {text[:200]}{'...' if len(text) > 200 else ''}"


def _time(value: Any) -> bool:
    """A plausible time in ms: a real number in [0, MAX_MS]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_MS
    )


def measurement_problem(value: Mapping[str, Any]) -> str | None:
    """What makes ``value`` an implausible :meth:`Measurement.to_dict` record, or ``None``.

    Every field must be present with its type; times must be finite, at most :data:`MAX_MS`,
    non-negative, with a positive median between p10 and p90; the spread finite and
    non-negative; at least one sample.
    """
    for name in ("median_ms", "p10_ms", "p90_ms", "rel_spread", "samples", "stable"):
        if name not in value:
            return f"'{name}' is missing"
    if "backend_id" not in value:
        return "'backend_id' is missing"
    for name in ("median_ms", "p10_ms", "p90_ms"):
        if not _time(value[name]):
            return f"'{name}' is {value[name]!r}, not a time in [0, {MAX_MS:g}] ms (an hour)"
    if not value["median_ms"] > 0:
        return f"'median_ms' is {value['median_ms']!r}, not positive"
    if not value["p10_ms"] <= value["median_ms"] <= value["p90_ms"]:
        return (
            f"percentiles out of order (p10 {value['p10_ms']!r}, median {value['median_ms']!r}, "
            f"p90 {value['p90_ms']!r})"
        )
    spread = value["rel_spread"]
    if isinstance(spread, bool) or not isinstance(spread, (int, float)):
        return f"'rel_spread' is {spread!r}, not a number"
    if not (math.isfinite(spread) and spread >= 0):
        return f"'rel_spread' is {spread!r}, not a finite non-negative number"
    for name in ("samples", "round_ms"):
        series = value.get(name, [])
        if not isinstance(series, list):
            return f"'{name}' is {type(series).__name__}, not a list of times"
        for t in series:
            if not _time(t):
                return f"'{name}' holds {t!r}, not a time in [0, {MAX_MS:g}] ms (an hour)"
    if not value["samples"]:
        return "'samples' is empty"
    if not isinstance(value["stable"], bool):
        return f"'stable' is {value['stable']!r}, not true or false"
    if not isinstance(value["backend_id"], str):
        return f"'backend_id' is {value['backend_id']!r}, not a string"
    return None
