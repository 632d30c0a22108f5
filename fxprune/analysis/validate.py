"""Plan validation: can this plan be applied to this analysed model?"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fxprune.analysis.consumers import check_consumers
from fxprune.core.errors import PlanError

if TYPE_CHECKING:
    from fxprune.analysis.analyze import Analysis
    from fxprune.core.plan import Plan

__all__ = ["validate_plan"]


def validate_plan(analysis: Analysis, plan: Plan) -> None:
    """Raise :class:`PlanError` unless this plan can be applied to ``analysis``."""
    if plan.signature and plan.signature != analysis.signature:
        raise PlanError(
            f"This plan was made for another architecture (plan signature {plan.signature}, "
            f"model signature {analysis.signature}). Re-create it for this model with "
            "fxprune.analyze(model, ...)."
        )
    groups = {g.name: g for g in analysis.groups}
    blocks = {b.name: b for b in analysis.blocks}
    for name in plan.removed_blocks:
        if name not in blocks:
            raise PlanError(
                f"Removed block '{name}' is not a removable block of this model "
                f"(known: {', '.join(list(blocks)[:8])}{'...' if len(blocks) > 8 else ''})."
            )
    internal = {g for b in plan.removed_blocks for g in analysis.internal_groups(blocks[b])}
    for name, idx in plan.kept.items():
        if name not in groups:
            raise PlanError(f"Unknown group '{name}' (not a coupling group of this model).")
        g = groups[name]
        if g.frozen and len(idx) != g.size:
            raise PlanError(f"Group '{name}' is frozen and cannot be pruned: {g.frozen[0]}")
        if idx and (idx[0] < 0 or idx[-1] >= g.size):
            raise PlanError(
                f"Group '{name}' has {g.size} channels; kept index "
                f"{idx[0] if idx[0] < 0 else idx[-1]} is out of range."
            )
        if len(set(idx)) != len(idx):
            raise PlanError(f"Group '{name}' lists a kept index twice.")
        if not idx and name not in internal:
            raise PlanError(
                f"Group '{name}' keeps no channel but is not inside a removed block. Keep at "
                "least one channel, or remove the block that contains it."
            )
        for parts in g.equal_count:
            mask = np.zeros(g.size, dtype=bool)
            mask[list(idx)] = True
            counts = {int(mask[p].sum()) for p in parts}
            if len(counts) > 1:
                raise PlanError(
                    f"Group '{name}' feeds a grouped op that needs the same number of kept "
                    f"channels in each of its {len(parts)} groups; the plan keeps "
                    f"{sorted(counts)}."
                )
    dead = {n for b in plan.removed_blocks for n in blocks[b].region}
    keep_unit = analysis.spaces.keep_units(plan.kept)
    counts = analysis.layer_keep(keep_unit)
    if plan.consumers:
        counts = check_consumers(analysis, plan, keep_unit, counts)
    for node, (k_in, k_out) in counts.items():
        if node not in dead and (k_in == 0 or k_out == 0):
            raise PlanError(
                f"Layer '{node}' would keep {k_in} input and {k_out} output channels; every "
                "layer outside a removed block must keep at least one of each."
            )
