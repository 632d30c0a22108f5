"""Channel-count rounding shared by planners and layers that align counts to a runtime."""

from __future__ import annotations

__all__ = ["aligned_count"]


def aligned_count(size: int, keep: float, multiple: int) -> int:
    """``keep·size`` rounded to a multiple of ``multiple`` (at least one multiple, at most size)."""
    k = round(keep * size / multiple) * multiple
    return int(min(size, max(k, min(multiple, size), 1)))
