"""From an analysed model to the solver's :class:`~fxprune.solver.Problem`, and back to a Plan.

The solver never sees an fx graph; this module is the only translator between the two worlds.

* **Groups.** Every prunable coupling group with a latency grid becomes a :class:`GroupSpec`
  whose options are the grid's counts (runtime-friendly counts, DESIGN.md §5). Option ``k`` is
  worth the importance of the group's top-``k`` indices (prefix sums of sorted scores; for a
  group feeding a grouped conv, the top ``k / parts`` of each part), normalised by the total
  importance of all groups in the problem, so the objective reads "fraction of importance kept".
* **Blocks.** A residual block is removable when it holds at least one group, every group
  produced inside it is in the problem, and it contains no other block (a nested block's outer
  block is left in place). Its groups get a leading option "count 0", taken iff the block goes:
  removing a block loses exactly the importance of the groups inside it (MDP's block score).
* **Ops.** Every conv/linear layer with a latency table is one :class:`OpCost` over the options
  of the group on its input and on its output. A layer axis that reads exactly one group's
  channels indexes that group's options directly. Any other axis (a concatenation of several
  groups, a flatten that repeats a channel, a slice of a group, frozen channels alongside) reads
  ``offset + Σ coef·count(g)`` channels — ``coef`` = the layer's positions of ``g`` per index of
  ``g`` — and becomes a *derived* group over the layer's grid of totals. Counts of 0 (inside a
  removed block) cost 0.
* **Calibration.** Table cells are ``a·C + per_layer`` and the constant is ``b``, the
  :class:`~fxprune.latency.LatencyModel`'s calibrated terms; the budget loop refits them on
  whole-model measurements.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fxprune.core.plan import Plan
from fxprune.solver import BlockSpec, GroupSpec, OpCost, Problem, Solution, complete

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.analysis.channel_groups import Group
    from fxprune.latency.predictor import LatencyModel

__all__ = ["PruningProblem", "build_problem", "keep_mask"]


def keep_mask(group: Group, scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` most important indices of ``group`` (equal per part for grouped convs)."""
    mask = np.zeros(group.size, dtype=bool)
    if count <= 0:
        return mask
    if group.equal_count:
        parts = [np.unique(p) for p in group.equal_count[0]]
        per = count // len(parts)
        for p in parts:
            mask[p[np.argsort(-scores[p], kind="stable")[:per]]] = True
        return mask
    mask[np.argsort(-scores, kind="stable")[:count]] = True
    return mask


@dataclass
class PruningProblem:
    """A :class:`Problem` plus what is needed to turn a solution back into a :class:`Plan`."""

    problem: Problem
    analysis: Analysis
    scores: dict[str, np.ndarray]
    total_importance: float
    importance_method: str
    #: the groups of the problem that are real coupling groups (not derived)
    group_names: tuple[str, ...]
    #: per problem block: the analysis groups it holds
    block_groups: dict[str, tuple[str, ...]]

    def plan(self, solution: Solution, notes: Mapping | None = None) -> Plan:
        """The Plan a solution describes: top-``k`` indices per group, removed blocks."""
        counts = solution.counts(self.problem)
        masks = {}
        for name in self.group_names:
            group = self.analysis.group(name)
            if self.problem.group(name).block in solution.removed:
                continue  # the whole block goes; its groups' indices do not matter
            masks[name] = keep_mask(group, self.scores[name], counts[name])
        plan = Plan.from_keep_masks(self.analysis, masks, sorted(solution.removed))
        return Plan(plan.kept, plan.removed_blocks, plan.signature, dict(notes or {}))

    def choice_of(self, plan: Plan) -> dict[str, int]:
        """The option per free group closest to (not above) a plan's kept counts (warm starts)."""
        out = {}
        removed = set(plan.removed_blocks)
        for name in self.group_names:
            spec = self.problem.group(name)
            if spec.block is not None and spec.block in removed:
                out[name] = 0
                continue
            kept = len(plan.kept.get(name, range(spec.counts[-1])))
            ok = [k for k, c in enumerate(spec.counts) if 0 < c <= kept]
            out[name] = ok[-1] if ok else next(k for k, c in enumerate(spec.counts) if c > 0)
        return out

    def importance_kept(self, plan: Plan) -> float:
        """Fraction of the problem's total importance a plan keeps (removed blocks keep 0)."""
        removed = {
            g
            for b in plan.removed_blocks
            for g in self.analysis.internal_groups(self.analysis.block(b))
        }
        kept = 0.0
        for name in self.group_names:
            if name in removed:
                continue
            s = self.scores[name]
            idx = plan.kept.get(name)
            kept += float(s.sum() if idx is None else s[list(idx)].sum())
        return kept / self.total_importance if self.total_importance > 0 else 1.0


def _innermost_blocks(analysis: Analysis) -> list:
    adds = {b.name for b in analysis.blocks}
    return [b for b in analysis.blocks if not (adds - {b.name}) & b.region]


def build_problem(
    analysis: Analysis,
    latency: LatencyModel,
    scores: Mapping[str, np.ndarray],
    *,
    importance_method: str = "",
    allow_block_removal: bool = True,
    include_inexact: bool = True,
) -> PruningProblem:
    """Translate an analysed model, its importance and its latency model into a Problem.

    Args:
        analysis: from :func:`fxprune.analyze`.
        latency: tables plus calibration (:class:`~fxprune.latency.LatencyModel`).
        scores: per group name, one score per index (:func:`channel_importance`).
        allow_block_removal: offer removable residual blocks to the solver.
        include_inexact: also prune groups whose pruning is not exactly masking (LayerNorm).
    """
    grids = latency.tables.group_grids
    free = _free_groups(analysis, grids, include_inexact)
    block_groups = (
        _removable_blocks(analysis, {g.name for g in free}) if allow_block_removal else {}
    )
    scores = {g.name: np.asarray(scores.get(g.name, np.zeros(g.size)), float) for g in free}
    total = float(sum(s.sum() for s in scores.values()))
    specs = _group_specs(free, scores, total, grids, block_groups)
    axes = _Axes(analysis, specs)
    ops = _ops(analysis, latency, axes, block_groups)  # makes the derived groups it needs
    problem = Problem(
        groups=(*specs.values(), *axes.derived.values()),
        ops=ops,
        blocks=tuple(BlockSpec(b) for b in block_groups),
        const=float(latency.b),
    )
    return PruningProblem(
        problem,
        analysis,
        scores,
        total,
        importance_method,
        tuple(specs),
        block_groups,
    )


def _free_groups(
    analysis: Analysis, grids: Mapping[str, Sequence[int]], include_inexact: bool
) -> list[Group]:
    """The groups the solver may shrink: prunable, two or more indices, a grid of counts."""
    return [
        g
        for g in analysis.groups
        if g.prunable
        and g.size >= 2
        and g.name in grids
        and (include_inexact or not g.inexact)
        and len(grids[g.name]) > 1
    ]


def _removable_blocks(analysis: Analysis, free_names: set[str]) -> dict[str, tuple[str, ...]]:
    """Per removable block, its groups: innermost blocks whose groups are all in the problem."""
    block_groups: dict[str, tuple[str, ...]] = {}
    for block in _innermost_blocks(analysis):
        inside = analysis.internal_groups(block)
        if inside and all(g in free_names for g in inside):
            block_groups[block.name] = tuple(inside)
    return block_groups


def _group_specs(
    free: Sequence[Group],
    scores: Mapping[str, np.ndarray],
    total: float,
    grids: Mapping[str, Sequence[int]],
    block_groups: Mapping[str, tuple[str, ...]],
) -> dict[str, GroupSpec]:
    """One spec per free group: its grid's counts, each worth its top-k share of ``total``.

    A group inside a removable block gets a leading option "count 0", worth nothing.
    """
    block_of_group = {g: b for b, inside in block_groups.items() for g in inside}
    specs: dict[str, GroupSpec] = {}
    for g in free:
        counts = tuple(int(c) for c in grids[g.name])
        value = [float(scores[g.name][keep_mask(g, scores[g.name], c)].sum()) for c in counts]
        block = block_of_group.get(g.name)
        if block is not None:
            counts, value = (0, *counts), [0.0, *value]
        norm = total if total > 0 else 1.0
        specs[g.name] = GroupSpec(g.name, counts, tuple(v / norm for v in value), block)
    return specs


class _Axes:
    """Which problem group each layer axis reads; derived groups are made as they appear."""

    def __init__(self, analysis: Analysis, specs: Mapping[str, GroupSpec]) -> None:
        self.analysis = analysis
        self.specs = specs
        #: free groups, then derived ones as they appear (the specs every op may name)
        self.all_specs: dict[str, GroupSpec] = dict(specs)
        self.derived: dict[tuple, GroupSpec] = {}
        self.gid_of = {g.name: i for i, g in enumerate(analysis.groups)}

    def group(self, units: np.ndarray, grid: tuple[int, ...]) -> str | None:
        """The problem group an axis of a layer reads (direct or derived), None if fixed."""
        spaces, groups = self.analysis.spaces, self.analysis.groups
        per_group: dict[str, int] = defaultdict(int)
        fixed = 0
        for c in spaces.unit_class[units].tolist():
            hit = spaces.class_index.get(c)
            name = groups[hit[0]].name if hit is not None else None
            if name in self.specs:
                per_group[name] += 1
            else:
                fixed += 1
        if not per_group:
            return None
        if len(per_group) == 1 and not fixed:
            ((name, n),) = per_group.items()
            if n == groups[self.gid_of[name]].size and tuple(grid) == tuple(
                c for c in self.specs[name].counts if c > 0
            ):
                return name
        members = tuple(
            (name, n / groups[self.gid_of[name]].size) for name, n in sorted(per_group.items())
        )
        return self._derived(tuple(grid), members, fixed)

    def _derived(self, grid: tuple[int, ...], members: tuple, fixed: int) -> str:
        """The derived group ``fixed + Σ coef·count(member)`` over ``grid`` (made once)."""
        key = (grid, members, fixed)
        if key not in self.derived:
            name = f"sum#{len(self.derived)}"
            self.derived[key] = self.all_specs[name] = GroupSpec(
                name,
                tuple(int(c) for c in grid),
                (0.0,) * len(grid),
                sum_of=members,
                offset=float(fixed),
            )
        return self.derived[key].name


def _ops(
    analysis: Analysis,
    latency: LatencyModel,
    axes: _Axes,
    block_groups: Mapping[str, tuple[str, ...]],
) -> tuple[OpCost, ...]:
    """One calibrated cost table per layer with a latency table, over its axes' groups."""
    records = {rec.node: rec for rec in analysis.spaces.layers}
    block_of_node = {n: b for b in block_groups for n in analysis.block(b).region}
    ops: list[OpCost] = []
    for node, lat in latency.tables.layers.items():
        rec = records[node]
        in_group = axes.group(rec.in_units, lat.in_grid) if "in" in lat.axes else None
        if lat.axes == "channel":
            out_group = axes.group(rec.out_units, lat.out_grid)
        else:
            out_group = axes.group(rec.out_units, lat.out_grid) if "out" in lat.axes else None
        ops.append(_op(node, lat, in_group, out_group, axes.all_specs, latency, block_of_node))
    return tuple(ops)


def _op(
    node: str,
    lat,
    in_group: str | None,
    out_group: str | None,
    specs: Mapping[str, GroupSpec],
    latency: LatencyModel,
    block_of_node: Mapping[str, str],
) -> OpCost:
    """One layer's cost table over its groups' options, calibrated; count 0 costs 0."""
    depthwise = lat.axes == "channel"
    if in_group is not None and in_group == out_group:
        in_group = None  # one space on both sides (depthwise-like): a vector over it
        depthwise = True
    full_in, full_out = lat.in_grid[-1], lat.out_grid[-1]
    in_counts = specs[in_group].counts if in_group else (full_in,)
    out_counts = specs[out_group].counts if out_group else (full_out,)
    table = np.zeros((len(in_counts), len(out_counts)))
    for i, ci in enumerate(in_counts):
        for j, co in enumerate(out_counts):
            if ci == 0 or co == 0:
                continue
            k_in = co if depthwise else ci
            table[i, j] = latency.a * latency.layer_cost(node, k_in, co) + latency.per_layer
    return OpCost(node, in_group, out_group, table, block_of_node.get(node))


def solution_from_plan(pp: PruningProblem, plan: Plan) -> Solution:
    """A :class:`Solution` for an existing plan (to warm-start the solver with it)."""
    from fxprune.solver import evaluate

    choice = complete(pp.problem, pp.choice_of(plan))
    removed = frozenset(b for b in plan.removed_blocks if b in pp.block_groups)
    value, lat = evaluate(pp.problem, choice, removed)
    return Solution(choice, removed, value, lat, "given", solver="plan")
