"""Simple plan makers: uniform width scaling by importance, aligned to runtime-friendly counts.

These are the data-free baselines (and the main job's default until a latency budget is given):
every prunable group keeps the same fraction of its channels, the most important ones, rounded to
a multiple of ``multiple`` because runtimes run aligned channel counts much faster (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fxprune.analysis.importance import magnitude_scores
from fxprune.core.counts import aligned_count
from fxprune.core.plan import Plan

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["random_plan", "uniform_plan"]


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


def random_plan(
    analysis: Analysis,
    seed: int,
    *,
    exact_only: bool = True,
    block_prob: float = 0.3,
    min_keep: float = 0.1,
) -> Plan:
    """A random valid plan, for tests and benchmarks: random kept sets and removed blocks.

    Args:
        exact_only: prune only groups whose pruning equals masking (no LayerNorm etc.).
        block_prob: probability that each removable block is removed.
        min_keep: smallest fraction of a group kept.
    """
    rng = np.random.default_rng(seed)
    removed = tuple(b.name for b in analysis.blocks if rng.random() < block_prob)
    internal = {g for b in removed for g in analysis.internal_groups(analysis.block(b))}
    masks: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        if g.frozen or (exact_only and g.inexact):
            continue
        mask = np.zeros(g.size, dtype=bool)
        if g.name in internal and rng.random() < 0.5:
            masks[g.name] = mask  # empty: allowed inside a removed block
            continue
        if g.equal_count:
            parts = g.equal_count[0]
            k = int(rng.integers(max(1, int(min_keep * len(parts[0]))), len(parts[0]) + 1))
            for p in parts:
                mask[rng.choice(np.unique(p), size=min(k, len(np.unique(p))), replace=False)] = True
            if len({int(mask[p].sum()) for p in parts}) > 1:
                mask[:] = True  # repeated indices made counts differ: keep the group whole
        else:
            k = int(rng.integers(max(1, int(np.ceil(min_keep * g.size))), g.size + 1))
            mask[rng.choice(g.size, size=k, replace=False)] = True
        masks[g.name] = mask
    plan = Plan.from_keep_masks(analysis, masks, removed)
    # A tensor whose channels all fell into pruned classes would leave a layer with no input or
    # output: give such groups their channels back (only ever adds indices).
    dead = {n for b in removed for n in analysis.block(b).region}
    for _ in range(len(analysis.groups) + 1):
        keep_unit = analysis.spaces.keep_units(plan.kept)
        empty = [
            rec
            for rec in analysis.spaces.layers
            if rec.node not in dead
            and (not keep_unit[rec.in_units].any() or not keep_unit[rec.out_units].any())
        ]
        if not empty:
            return plan
        for rec in empty:
            for units in (rec.in_units, rec.out_units):
                for gid in analysis.spaces.groups_of(units):
                    masks.pop(analysis.groups[gid].name, None)
        plan = Plan.from_keep_masks(analysis, masks, removed)
    return plan
