"""From an analysed model to the solver's :class:`~fxprune.solver.Problem`, and back to a Plan.

The solver never sees an fx graph; this module is the only translator between the two worlds.

* **Groups.** Every prunable coupling group with a latency grid becomes a :class:`GroupSpec`
  whose options are the grid's counts (runtime-friendly counts, DESIGN.md §5). Option ``k`` is
  worth the importance of the ``k`` indices :func:`keep_mask` keeps, normalised by the total
  importance of all groups in the problem, so the objective reads "fraction of importance kept".
* **Segments.** A layer may read only part of a group (a channel split: ShuffleNet's halves,
  Res2Net's chunks), some indices more than once. The group's indices are partitioned by which
  layer axes read them, and a count is shared out over the segments in proportion to their sizes
  (at least one each once the count allows), each keeping its top scores. So a layer reading a
  slice keeps its share of the count — what the derived groups below assume — and never nothing.
  An option whose kept indices would still leave some layer axis empty, or that cannot be kept
  exactly (a grouped conv's equal parts), is not offered: any solution's plan is valid.
* **Blocks.** A residual block is removable when it holds at least one group, every group
  produced inside it is in the problem, and it contains no other block (a nested block's outer
  block is left in place). Its groups get a leading option "count 0", taken iff the block goes:
  removing a block loses exactly the importance of the groups inside it (MDP's block score).
* **Ops.** Every conv/linear layer (and attention unit, ``Analysis.attention_layers``) with a
  latency table is one :class:`OpCost` over the options
  of the group on its input and on its output. A layer axis that reads each index of exactly one
  group once indexes that group's options directly. Any other axis (a concatenation of several
  groups, a flatten that repeats a channel, a slice of a group, frozen channels alongside) reads
  ``offset + Σ share(g)`` channels — ``share(g)`` at each option of ``g`` = the axis's positions
  among the indices that option keeps, known exactly since :func:`keep_mask` is deterministic —
  and becomes a *derived* group: over its exact totals when it reads one group, else over the
  layer's grid of totals (rounded up). Counts of 0 (inside a removed block) cost 0.
* **Resources.** ``max_params`` / ``max_macs`` become :class:`~fxprune.solver.Resource` rows:
  every conv / linear / norm layer's parameters and MACs as a table over the options of its
  input and output groups (``cin·cout·k²`` and the output's spatial size times that; a norm's
  affine parameters per kept channel), the rest of the model a constant, so the dense model's
  figures are exact and a plan's are those of its pruned model (a derived count rounds up).
  ``max_activation_bytes`` becomes a *peak* resource: one row per live set of the execution
  order (:mod:`fxprune.pipeline.memory`, removed blocks included).
* **Calibration.** Table cells are ``a·C + per_layer`` and the constant is ``b``, the
  :class:`~fxprune.latency.LatencyModel`'s calibrated terms; the budget loop refits them on
  whole-model measurements.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fxprune.core.meta import TENSOR_META
from fxprune.core.plan import Plan
from fxprune.pipeline.memory import activation_resource
from fxprune.solver import BlockSpec, GroupSpec, OpCost, Problem, Resource, Solution, complete

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.analysis.channel_groups import Group
    from fxprune.latency.predictor import LatencyModel

__all__ = ["PruningProblem", "apportion", "build_problem", "keep_mask", "read_segments"]

logger = logging.getLogger(__name__)


def keep_mask(
    group: Group,
    scores: np.ndarray,
    count: int,
    segments: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """The ``count`` indices of ``group`` to keep: the most important of each segment.

    ``count`` is shared out equally over a grouped conv's parts, and within each part over
    ``segments`` (index sets that layers read wholly or not at all, see :func:`read_segments`)
    in proportion to their sizes, at least one each when the count allows (:func:`apportion`).
    Without segments the whole group is one segment: its top-``count`` scores.
    """
    mask = np.zeros(group.size, dtype=bool)
    if count <= 0:
        return mask
    if group.equal_count:
        # parts that are the same index set (a grouped conv whose groups all read one tensor,
        # ResNeSt's radix convs) are one part: it keeps ``count`` once, not count/parts twice
        unique = {tuple(np.unique(p)): np.unique(p) for p in group.equal_count[0]}
        parts = list(unique.values())
        per = count // len(parts)
    else:
        parts, per = [np.arange(group.size)], count
    for p in parts:
        subs = [p] if segments is None or len(segments) < 2 else _split(p, segments)
        for s, k in zip(subs, apportion(per, [len(s) for s in subs]), strict=True):
            mask[s[np.argsort(-scores[s], kind="stable")[:k]]] = True
    return mask


def _split(indices: np.ndarray, segments: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``indices`` cut along ``segments`` (non-empty pieces, in segment order)."""
    pieces = [np.intersect1d(indices, s) for s in segments]
    return [x for x in pieces if x.size]


def apportion(count: int, sizes: Sequence[int]) -> np.ndarray:
    """``count`` shared over bins of ``sizes`` in proportion (largest remainder, ties to the
    first bin), each bin at most its size and at least 1 when ``count ≥ len(sizes)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if count >= total:
        return sizes.copy()
    quota = count * sizes / total
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: count - int(alloc.sum())]] += 1
    if count >= len(sizes):  # no bin left empty: a bin with two or more gives one up
        for j in np.flatnonzero(alloc == 0):
            alloc[int(np.argmax(alloc))] -= 1
            alloc[j] += 1
    return alloc


def _axis_reads(analysis: Analysis) -> dict[str, list[np.ndarray]]:
    """Per group, the distinct indices of it that each layer axis (input, output) reads."""
    spaces = analysis.spaces
    n = len(spaces.unit_class)
    gid = np.full(n, -1, dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    for c, (g, i) in spaces.class_index.items():
        gid[c], pos[c] = g, i
    reads: dict[str, list[np.ndarray]] = defaultdict(list)
    for rec in spaces.layers:
        for units in (rec.in_units, rec.out_units):
            cls = spaces.unit_class[np.asarray(units).ravel()]
            g, i = gid[cls], pos[cls]
            for k in np.unique(g[g >= 0]).tolist():
                reads[analysis.groups[k].name].append(np.unique(i[g == k]))
    return reads


def read_segments(size: int, reads: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The indices ``0..size-1`` partitioned by which of ``reads`` contain them.

    Every read is a union of segments; ordered by first index. One segment when every read
    covers the whole group (the common case).
    """
    if all(r.size == size for r in reads):
        return (np.arange(size),)
    member = np.zeros((size, len(reads)), dtype=bool)
    for j, r in enumerate(reads):
        member[r, j] = True
    _, inverse = np.unique(member, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    segments = [np.flatnonzero(inverse == k) for k in np.unique(inverse)]
    return tuple(sorted(segments, key=lambda s: int(s[0])))


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
    #: per group split by what layers read of it: its segments (see :func:`read_segments`)
    segments: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)

    def plan(self, solution: Solution, notes: Mapping | None = None) -> Plan:
        """The Plan a solution describes: top-``k`` indices per group, removed blocks."""
        counts = solution.counts(self.problem)
        masks = {}
        for name in self.group_names:
            group = self.analysis.group(name)
            if self.problem.group(name).block in solution.removed:
                continue  # the whole block goes; its groups' indices do not matter
            masks[name] = keep_mask(group, self.scores[name], counts[name], self.segments.get(name))
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
    min_keep: float = 0.0,
    max_params: int | None = None,
    max_macs: int | None = None,
    max_activation_bytes: int | None = None,
    also: Mapping[str, LatencyModel] | None = None,
) -> PruningProblem:
    """Translate an analysed model, its importance and its latency model into a Problem.

    Args:
        analysis: from :func:`fxprune.analyze`.
        latency: tables plus calibration (:class:`~fxprune.latency.LatencyModel`).
        scores: per group name, one score per index (:func:`channel_importance`).
        allow_block_removal: offer removable residual blocks to the solver.
        include_inexact: also prune groups whose pruning is not exactly masking (LayerNorm).
        min_keep: offer no count below this fraction of a group's size (besides a removed
            block's 0).
        max_params, max_macs: limits on the pruned model's parameters and conv/linear MACs
            (as :func:`~fxprune.pipeline.report.count_params` / ``count_macs`` count them),
            each a :class:`~fxprune.solver.Resource` row; None: no limit.
        max_activation_bytes: a limit on the pruned model's peak activation memory
            (:func:`~fxprune.analysis.liveness.peak_activation_bytes` at the example inputs'
            shapes): one row per live set (:mod:`fxprune.pipeline.memory`); None: no limit.
        also: latency models of further backends by label: each a resource
            ``"latency@<label>"`` priced like the latency (its own tables and calibration, the
            same groups), with no limit yet (the budget loop sets it per round).
    """
    grids = latency.tables.group_grids
    free = _free_groups(analysis, grids, include_inexact)
    block_groups = (
        _removable_blocks(analysis, {g.name for g in free}) if allow_block_removal else {}
    )
    scores = {g.name: np.asarray(scores.get(g.name, np.zeros(g.size)), float) for g in free}
    total = float(sum(s.sum() for s in scores.values()))
    reads = _axis_reads(analysis)
    segments = {g.name: read_segments(g.size, reads[g.name]) for g in free}
    segments = {name: seg for name, seg in segments.items() if len(seg) > 1}
    specs, masks = _group_specs(free, scores, total, grids, block_groups, reads, segments, min_keep)
    axes = _Axes(analysis, specs, masks)
    ops = _ops(analysis, latency, axes, block_groups)  # makes the derived groups it needs
    limits = {"params": max_params, "macs": max_macs}
    resources = _resources(analysis, axes, ops, block_groups, limits)
    if max_activation_bytes is not None:
        peak = activation_resource(analysis, axes, block_groups, max_activation_bytes)
        resources = (*resources, peak)
    for label, other in (also or {}).items():  # may add derived groups over its grids
        priced = _ops(analysis, other, axes, block_groups)
        resources = (*resources, Resource(f"latency@{label}", priced, np.inf, float(other.b)))
    problem = Problem(
        groups=(*specs.values(), *axes.derived.values()),
        ops=ops,
        blocks=tuple(BlockSpec(b) for b in block_groups),
        const=float(latency.b),
        resources=resources,
    )
    return PruningProblem(
        problem,
        analysis,
        scores,
        total,
        importance_method,
        tuple(specs),
        block_groups,
        segments,
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
    reads: Mapping[str, Sequence[np.ndarray]],
    segments: Mapping[str, tuple[np.ndarray, ...]],
    min_keep: float = 0.0,
) -> tuple[dict[str, GroupSpec], dict[str, list[np.ndarray]]]:
    """One spec per free group (its grid's valid counts, each worth its kept share of
    ``total``), and per group the kept-index mask of each option.

    A count is offered only if :func:`keep_mask` keeps exactly that many indices and every
    layer axis reading the group keeps at least one of them (always true of the full count).
    A group inside a removable block gets a leading option "count 0", worth nothing. Counts
    under ``min_keep`` of the group's size are not offered (the full count always is).
    """
    block_of_group = {g: b for b, inside in block_groups.items() for g in inside}
    specs: dict[str, GroupSpec] = {}
    masks: dict[str, list[np.ndarray]] = {}
    for g in free:
        counts, value, kept = [], [], []
        for c in sorted({int(c) for c in grids[g.name]}):
            if c < min_keep * g.size and c < g.size:
                continue
            mask = keep_mask(g, scores[g.name], c, segments.get(g.name))
            if int(mask.sum()) == c and all(mask[r].any() for r in reads.get(g.name, ())):
                counts.append(c)
                value.append(float(scores[g.name][mask].sum()))
                kept.append(mask)
        if not counts:  # no count keeps its parts consistent: the group stays whole
            logger.info("group %s: no smaller count keeps its parts equal; kept whole", g.name)
            counts, value, kept = [g.size], [float(scores[g.name].sum())], [np.ones(g.size, bool)]
        block = block_of_group.get(g.name)
        if block is not None:
            counts, value = [0, *counts], [0.0, *value]
            kept.insert(0, np.zeros(g.size, dtype=bool))
        norm = total if total > 0 else 1.0
        specs[g.name] = GroupSpec(g.name, tuple(counts), tuple(v / norm for v in value), block)
        masks[g.name] = kept
    return specs, masks


class _Axes:
    """Which problem group each layer axis reads; derived groups are made as they appear."""

    def __init__(
        self,
        analysis: Analysis,
        specs: Mapping[str, GroupSpec],
        masks: Mapping[str, Sequence[np.ndarray]],
    ) -> None:
        self.analysis = analysis
        self.specs = specs
        self.masks = masks
        #: free groups, then derived ones as they appear (the specs every op may name)
        self.all_specs: dict[str, GroupSpec] = dict(specs)
        self.derived: dict[tuple, GroupSpec] = {}
        self.gid_of = {g.name: i for i, g in enumerate(analysis.groups)}

    def reads(self, units: np.ndarray) -> tuple[dict[str, list[int]], int]:
        """Per problem group, the indices of it at the positions ``units``; and how many
        positions no problem group prunes (frozen, or outside the problem)."""
        spaces, groups = self.analysis.spaces, self.analysis.groups
        per_group: dict[str, list[int]] = defaultdict(list)
        fixed = 0
        for c in spaces.unit_class[units].tolist():
            hit = spaces.class_index.get(c)
            name = groups[hit[0]].name if hit is not None else None
            if name in self.specs:
                per_group[name].append(hit[1])
            else:
                fixed += 1
        return per_group, fixed

    def group(self, units: np.ndarray, grid: tuple[int, ...]) -> str | None:
        """The problem group an axis of a layer reads (direct or derived), None if fixed."""
        groups = self.analysis.groups
        per_group, fixed = self.reads(units)
        if not per_group:
            return None
        if len(per_group) == 1 and not fixed:
            ((name, idx),) = per_group.items()
            size = groups[self.gid_of[name]].size
            # direct only when the axis reads every index once: a slice, or an index read
            # twice, keeps a share of the count, which a derived group models
            if len(idx) == size == len(set(idx)) and {
                c for c in self.specs[name].counts if c > 0
            } <= set(grid):
                return name
        members = tuple((name, self.shares(name, idx)) for name, idx in sorted(per_group.items()))
        if len(members) == 1:  # its totals are known exactly: they are the options
            grid = tuple(sorted({int(fixed + t) for t in members[0][1]}))
        return self._derived(tuple(grid), members, fixed)

    def shares(self, name: str, idx: list[int]) -> tuple[float, ...]:
        """Per option of group ``name``: how many of the axis's positions ``idx`` it keeps."""
        reads = np.bincount(np.asarray(idx, dtype=np.int64), minlength=len(self.masks[name][0]))
        return tuple(float(reads[mask].sum()) for mask in self.masks[name])

    def _derived(self, grid: tuple[int, ...], members: tuple, fixed: int) -> str:
        """The derived group ``fixed + Σ share(member)`` over ``grid`` (made once)."""
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
    records = {rec.node: rec for rec in [*analysis.spaces.layers, *analysis.attention_layers]}
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


def _layer_counts(
    rec, module, out_shape: Sequence[int]
) -> tuple[Callable[[int, int], float], Callable[[int, int], float], int, int]:
    """A layer's (params(cin, cout), MACs(cin, cout), full cin, full cout), as
    :func:`~fxprune.pipeline.report.count_params` / ``count_macs`` count the pruned layer."""
    from torch import nn

    positions = int(np.prod(out_shape)) // max(int(out_shape[1] if len(out_shape) > 1 else 1), 1)
    if isinstance(module, nn.modules.conv._ConvNd):
        k = int(np.prod(module.kernel_size))
        g, full_in, full_out = module.groups, module.in_channels, module.out_channels
        bias = module.bias is not None
        if g == 1:
            per_out = lambda ci: ci * k  # noqa: E731
        elif g == full_in:  # depthwise-like: every output reads its own inputs
            per_out = lambda ci: (full_in // g) * k  # noqa: E731
        else:  # grouped: the parts keep equal counts, the group count stays
            per_out = lambda ci: ci / g * k  # noqa: E731
        params = lambda ci, co: co * per_out(ci) + (co if bias else 0)  # noqa: E731
        macs = lambda ci, co: positions * co * per_out(ci)  # noqa: E731
        return params, macs, full_in, full_out
    if isinstance(module, nn.Linear):
        positions = int(np.prod(out_shape[:-1]))
        bias = module.bias is not None
        full_in, full_out = module.in_features, module.out_features
        params = lambda ci, co: co * ci + (co if bias else 0)  # noqa: E731
        macs = lambda ci, co: positions * co * ci  # noqa: E731
        return params, macs, full_in, full_out
    full = len(rec.out_units)
    own = sum(p.numel() for p in module.parameters(recurse=False))
    return (lambda ci, co: own * co / full), (lambda ci, co: 0.0), full, full


def _resources(
    analysis: Analysis,
    axes: _Axes,
    ops: Sequence[OpCost],
    block_groups: Mapping[str, tuple[str, ...]],
    limits: Mapping[str, int | None],
) -> tuple[Resource, ...]:
    """One :class:`Resource` per given limit: per layer a table of its parameters or MACs
    over its groups' options (a layer with a latency table reads the groups its latency op
    reads), the rest of the model the constant (so the full choice is the dense figure).

    A module called more than once counts its parameters once (as ``count_params`` does) and
    its MACs per call.
    """
    from fxprune.pipeline.report import count_macs, count_params

    wanted = {name: limit for name, limit in limits.items() if limit is not None}
    if not wanted:
        return ()
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    by_node = {op.name: op for op in ops}
    block_of_node = {n: b for b in block_groups for n in analysis.block(b).region}
    tables: dict[str, list[OpCost]] = {name: [] for name in wanted}
    modelled = dict.fromkeys(wanted, 0.0)
    seen: set[str] = set()
    for rec in analysis.spaces.layers:
        meta = nodes[rec.node].meta.get(TENSOR_META) if rec.node in nodes else None
        if meta is None or not hasattr(meta, "shape"):
            continue  # no shapes: its figures stay in the constant, as count_macs skips it
        module = analysis.gm.get_submodule(rec.target)
        params, macs, full_in, full_out = _layer_counts(rec, module, meta.shape)
        if rec.node in by_node:
            in_group, out_group = by_node[rec.node].in_group, by_node[rec.node].out_group
        else:
            out_group = axes.group(rec.out_units, tuple(range(len(rec.out_units) + 1)))
            in_group = None
            if rec.kind != "norm":
                in_group = axes.group(rec.in_units, tuple(range(len(rec.in_units) + 1)))
            if in_group is not None and in_group == out_group:
                in_group = None
        in_counts = axes.all_specs[in_group].counts if in_group else (full_in,)
        out_counts = axes.all_specs[out_group].counts if out_group else (full_out,)
        counted = {"params": rec.target not in seen, "macs": True}
        seen.add(rec.target)
        fn = {"params": params, "macs": macs}
        for name in wanted:
            if not counted[name]:
                continue
            table = np.array(
                [
                    [0.0 if ci == 0 or co == 0 else float(fn[name](ci, co)) for co in out_counts]
                    for ci in in_counts
                ]
            )
            tables[name].append(
                OpCost(
                    f"{rec.node}:{name}", in_group, out_group, table, block_of_node.get(rec.node)
                )
            )
            modelled[name] += float(fn[name](full_in, full_out))
    dense = {"params": count_params(analysis.gm), "macs": count_macs(analysis.gm)}
    return tuple(
        Resource(name, tuple(tables[name]), float(limit), float(dense[name] - modelled[name]))
        for name, limit in wanted.items()
    )


def solution_from_plan(pp: PruningProblem, plan: Plan) -> Solution:
    """A :class:`Solution` for an existing plan (to warm-start the solver with it)."""
    from fxprune.solver import evaluate

    choice = complete(pp.problem, pp.choice_of(plan))
    removed = frozenset(b for b in plan.removed_blocks if b in pp.block_groups)
    value, lat = evaluate(pp.problem, choice, removed)
    return Solution(choice, removed, value, lat, "given", solver="plan")
