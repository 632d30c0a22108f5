"""Check that a pruned model has the channel counts its plan gives every layer.

The masking oracle cannot see a wrong *shape*: a masked model computes on full tensors, so a
plan that empties a tensor the graph needs masks fine and fails only once pruned. Random-plan
tests and the coverage bench therefore run this check beside the oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fxprune.analysis.consumers import check_consumers
from fxprune.core.errors import FxpruneError

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["check_planned_shapes", "planned_counts"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FxpruneError(f"pruned model does not match its plan: {message}")


def planned_counts(analysis: Analysis, plan: Plan) -> dict[str, tuple[int, int]]:
    """(in, out) channel counts of every live weight-layer call under ``plan``, consumers' own
    inputs included (exact reads: no zero-padded columns)."""
    keep_unit = analysis.spaces.keep_units(plan.kept)
    counts = analysis.layer_keep(keep_unit)
    if plan.consumers:
        counts = check_consumers(analysis, plan, keep_unit, counts)
    dead = {n for b in plan.removed_blocks for n in analysis.block(b).region}
    return {node: c for node, c in counts.items() if node not in dead}


def check_planned_shapes(analysis: Analysis, plan: Plan, pruned: torch.fx.GraphModule) -> None:
    """Every conv / linear / norm module the pruned model calls has the channel counts that
    ``plan`` gives it (weights and running statistics included).

    The masking oracle cannot see a wrong *shape*: a masked model computes on full tensors, so a
    plan that empties a tensor the graph needs (a one-channel slice broadcast against its own
    tensor) masks fine and crashes only once pruned. The caller also runs the pruned model.
    """
    counts = planned_counts(analysis, plan)
    modules = dict(pruned.named_modules())
    for rec in analysis.spaces.layers:
        if rec.node not in counts or not _is_module(analysis, rec.target):
            continue  # in a removed block, or a functional layer (F.layer_norm)
        k_in, k_out = counts[rec.node]
        m = modules.get(rec.target)
        _require(m is not None, f"layer '{rec.target}' (node {rec.node}) is live but missing")
        where = f"'{rec.target}' (node {rec.node})"
        if isinstance(m, nn.modules.conv._ConvNd):
            groups = k_in if rec.groups > 1 and rec.groups == len(rec.in_units) else rec.groups
            got = (m.in_channels, m.out_channels, m.groups, tuple(m.weight.shape[:2]))
            want = (k_in, k_out, groups, (k_out, k_in // groups))
        elif isinstance(m, nn.Linear):
            got = (m.in_features, m.out_features, tuple(m.weight.shape))
            want = (k_in, k_out, (k_out, k_in))
        else:
            got = tuple(int(t.shape[-1]) for t in _norm_tensors(m))
            want = (k_out,) * len(got)
            _require(got, f"{where}: no channel-sized state to check on {type(m).__name__}")
        _require(got == want, f"{where}: pruned {got}, planned {want}")


def _is_module(analysis: Analysis, target: str) -> bool:
    try:
        analysis.gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def _norm_tensors(m: nn.Module) -> list[torch.Tensor]:
    """The channel-sized state of a normalisation module (affine weights, running statistics,
    LayerNorm's normalized shape)."""
    found = [
        t
        for t in (
            getattr(m, "weight", None),
            getattr(m, "bias", None),
            getattr(m, "running_mean", None),
            getattr(m, "running_var", None),
        )
        if isinstance(t, torch.Tensor)
    ]
    if isinstance(m, nn.LayerNorm):
        found.append(torch.empty(m.normalized_shape))
    elif isinstance(m, nn.GroupNorm):
        found.append(torch.empty(m.num_channels))
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        found.append(torch.empty(m.num_features))
    return found
