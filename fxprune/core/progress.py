"""Progress of long work, reported without tying the library to a terminal.

Library code asks :func:`reporter` for the current reporter and calls ``add_task`` /
``advance`` on it. By default that logs through :mod:`logging` (a line at each quarter of a
task); the CLI installs a rich progress bar with :func:`reporting` (``rich.progress.Progress``
has exactly this interface), so the library itself never writes to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol, runtime_checkable

__all__ = ["LoggingReporter", "Reporter", "reporter", "reporting"]

log = logging.getLogger("fxprune")


@runtime_checkable
class Reporter(Protocol):
    """Receives progress: a task with a known total, advanced in steps."""

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> Any: ...

    def advance(self, task_id: Any, advance: float = 1) -> None: ...


class LoggingReporter:
    """Logs each task at its start, at every quarter and at its end (INFO)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or log
        self._tasks: dict[int, list[Any]] = {}

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task = len(self._tasks)
        self._tasks[task] = [description, total or 0, 0.0, 0]
        self.logger.info("%s: 0/%s", description, int(total or 0))
        return task

    def advance(self, task_id: int, advance: float = 1) -> None:
        rec = self._tasks[task_id]
        description, total = rec[0], rec[1]
        rec[2] += advance
        quarter = int(4 * rec[2] / total) if total else 0
        if quarter > rec[3]:
            rec[3] = quarter
            self.logger.info("%s: %d/%d", description, int(rec[2]), int(total))


_current: ContextVar[Reporter | None] = ContextVar("fxprune_progress", default=None)


def reporter() -> Reporter:
    """The reporter installed by :func:`reporting`, else one that logs."""
    return _current.get() or LoggingReporter()


@contextlib.contextmanager
def reporting(target: Reporter) -> Iterator[Reporter]:
    """Send the library's progress to ``target`` (e.g. a ``rich.progress.Progress``) inside."""
    token = _current.set(target)
    try:
        yield target
    finally:
        _current.reset(token)
