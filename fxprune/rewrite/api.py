"""The small public surface: analyse, apply a plan, rebuild a saved pruned model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxprune.analysis import Analysis, analyze
from fxprune.core.plan import Plan
from fxprune.rewrite.prune import apply_plan
from fxprune.rewrite.segment import SegmentCost

__all__ = ["prune", "rebuild"]


def prune(analysis: Analysis, plan: Plan, **options: Any) -> fx.GraphModule:
    """The pruned GraphModule for ``plan``; the analysed model and the user's model are untouched.

    Options (unconstrained plans): ``reorder=True`` (permute channels so consumers read slices),
    ``reads="exact" | "auto" | "full"`` and ``read_cost`` — see
    :func:`fxprune.rewrite.prune.rewrite`.
    """
    return apply_plan(analysis, plan, **options)


def rebuild(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    plan: Plan | str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | str | os.PathLike | None = None,
) -> fx.GraphModule:
    """Re-create a saved pruned model from its original architecture, its plan and its weights.

    This is the portable way to load a result (no pickled code): build the original model the
    same way, pass the plan file and the pruned state dict written by ``save``.
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    recorded = ("reads", "segment_block", "read_block")
    options = {k: plan.notes[k] for k in recorded if k in plan.notes}
    if "segment_cost" in plan.notes:  # the price the segments were merged under
        options["segment_cost"] = SegmentCost(**plan.notes["segment_cost"])
    pruned = apply_plan(analyze(model, example_inputs), plan, **options)
    if state_dict is not None:
        if not isinstance(state_dict, dict):
            state_dict = torch.load(Path(state_dict), map_location="cpu", weights_only=True)
        pruned.load_state_dict(state_dict)
    return pruned
