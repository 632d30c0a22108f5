"""Random sub-networks on the candidate grid, for calibrating and evaluating latency models.

``fxprune.random_plan`` draws arbitrary kept counts, which the solver never offers (unaligned
counts are exactly what the runtime runs badly). These plans draw every group's kept count from
its candidate grid (``LatencyTables.group_grids``), keep random indices, and remove random
blocks, respecting grouped-conv equal-count rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fxprune.core.plan import Plan

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["random_aligned_plan"]


def random_aligned_plan(
    analysis: Analysis,
    grids: Mapping[str, Sequence[int]],
    seed: int,
    *,
    block_prob: float = 0.2,
    exact_only: bool = True,
) -> Plan:
    """A valid plan whose every pruned group keeps a count from ``grids[group]``.

    Args:
        grids: candidate counts per group name (groups not listed keep everything).
        block_prob: probability that each removable block is removed.
        exact_only: leave groups whose pruning is not exactly masking (LayerNorm…) whole.
    """
    rng = np.random.default_rng(seed)
    removed = tuple(b.name for b in analysis.blocks if rng.random() < block_prob)
    masks: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        grid = [int(c) for c in grids.get(g.name, ()) if 0 < c <= g.size]
        if g.frozen or (exact_only and g.inexact) or not grid:
            continue
        k = int(rng.choice(grid))
        mask = np.zeros(g.size, dtype=bool)
        if g.equal_count:
            parts = [np.unique(p) for p in g.equal_count[0]]
            per = max(1, min(k // len(parts), min(len(p) for p in parts)))
            for p in parts:
                mask[rng.choice(p, size=per, replace=False)] = True
            if len({int(mask[p].sum()) for p in g.equal_count[0]}) > 1:
                continue  # overlapping partitions: keep the group whole
        else:
            mask[rng.choice(g.size, size=k, replace=False)] = True
        masks[g.name] = mask
    plan = Plan.from_keep_masks(analysis, masks, removed)
    plan = Plan(
        plan.kept, plan.removed_blocks, plan.signature, {"sampler": "aligned", "seed": seed}
    )
    plan.validate(analysis)
    return plan
