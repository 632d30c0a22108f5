"""Hypothesis strategies for plans on small analysed models."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import fxprune


@st.composite
def plans(draw, analysis: fxprune.Analysis, exact_only: bool = True, blocks: bool = True):
    """Any valid plan: per group an arbitrary non-empty kept set, any subset of blocks removed."""
    removed = (
        [b.name for b in analysis.blocks if draw(st.booleans())]
        if blocks and analysis.blocks
        else []
    )
    masks = {}
    for g in analysis.groups:
        if g.frozen or (exact_only and g.inexact) or g.size < 2:
            continue
        mask = np.zeros(g.size, dtype=bool)
        if g.equal_count:
            parts = [np.unique(p) for p in g.equal_count[0]]
            k = draw(st.integers(1, len(parts[0])))
            for p in parts:
                chosen = draw(st.permutations(list(p)))[:k]
                mask[chosen] = True
        else:
            kept = draw(st.sets(st.integers(0, g.size - 1), min_size=1, max_size=g.size))
            mask[sorted(kept)] = True
        masks[g.name] = mask
    plan = fxprune.Plan.from_keep_masks(analysis, masks, removed)
    try:
        plan.validate(analysis)
    except fxprune.PlanError:
        # a tensor whose only channels were pruned: fall back to keeping those groups whole
        plan = fxprune.Plan({}, tuple(removed), analysis.signature)
    return plan
