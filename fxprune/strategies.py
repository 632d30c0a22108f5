"""Simple plan makers: uniform width scaling by importance, aligned to runtime-friendly counts.

These are the data-free baselines (and the main job's default until a latency budget is given):
every prunable group keeps the same fraction of its channels, the most important ones, rounded to
a multiple of ``multiple`` because runtimes run aligned channel counts much faster (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fxprune.passes.importance import magnitude_scores
from fxprune.plan import Plan

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["aligned_count", "uniform_plan"]


def aligned_count(size: int, keep: float, multiple: int) -> int:
    """``keep·size`` rounded to a multiple of ``multiple`` (at least one multiple, at most size)."""
    k = round(keep * size / multiple) * multiple
    return int(min(size, max(k, min(multiple, size), 1)))


def uniform_plan(
    analysis: Analysis,
    keep: float,
    *,
    multiple: int = 8,
    scores: Mapping[str, np.ndarray] | None = None,
    include_inexact: bool = False,
) -> Plan:
    """Keep the top ``keep`` fraction of every prunable group, by importance score.

    Args:
        keep: fraction of each group's channels kept, in (0, 1].
        multiple: kept counts are rounded to a multiple of this.
        scores: per group, one score per channel; L2 magnitude by default.
        include_inexact: also prune *inexact* groups, whose channels reach a LayerNorm or a
            GroupNorm (or another reduction over channels). Pruning those changes the norm's
            statistics, so the pruned model is no longer the original with those channels
            zeroed (``masked_forward``), only an approximation to fine-tune. Off by default:
            such groups keep every channel and the plan is exact.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = scores if scores is not None else magnitude_scores(analysis)
    masks: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        if g.frozen or (g.inexact and not include_inexact) or g.size < 2:
            continue
        s = np.asarray(scores.get(g.name, np.zeros(g.size)), dtype=float)
        mask = np.zeros(g.size, dtype=bool)
        if g.equal_count:
            parts = [np.unique(p) for p in g.equal_count[0]]
            k = aligned_count(len(parts[0]), keep, 1)
            for p in parts:
                mask[p[np.argsort(-s[p], kind="stable")[:k]]] = True
            if len({int(mask[p].sum()) for p in g.equal_count[0]}) > 1:
                continue
        else:
            k = aligned_count(g.size, keep, multiple)
            mask[np.argsort(-s, kind="stable")[:k]] = True
        masks[g.name] = mask
    plan = Plan.from_keep_masks(analysis, masks)
    return Plan(
        plan.kept,
        (),
        analysis.signature,
        {
            "strategy": "uniform",
            "keep": keep,
            "multiple": multiple,
            "importance": "l2-magnitude",
            "include_inexact": include_inexact,
        },
    )
