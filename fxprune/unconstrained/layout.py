"""Channel reordering for unconstrained plans: one permutation per coupling group.

In an unconstrained plan several consumers read different subsets of one tensor. A consumer whose
subset occupies one contiguous range reads a slice; any other needs a gather (a memory copy). We
may permute a group's channels freely — every producer's output rows, every follower (BN,
depthwise conv, SE scale, layer scale) and every consumer's input columns together — so we pick,
per group, the order that makes the most consumer subsets contiguous (:mod:`fxprune.unconstrained.consecutive`:
exact when a zero-copy order exists, a bounded greedy otherwise).

A group is reordered only when every op that touches it provably commutes with a channel
permutation: elementwise ops, adds and multiplies, per-channel layers, pooling, reductions, and
concatenation (where the group occupies one contiguous block). Anything positional — splits,
slices, views that fold channels, grouped convs, GroupNorm — keeps the group in its original
order (it is still pruned; only the gathers stay). The result is a :class:`Layout`: for any
channel map, which original positions the rewritten tensor holds, in which order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import fx, nn

from fxprune.analysis.ops import traits_of
from fxprune.core.meta import CHANNELS
from fxprune.unconstrained.consecutive import is_contiguous, order_channels

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.analysis.consumers import Consumer
    from fxprune.core.plan import Plan

__all__ = ["GroupOrder", "Layout", "channel_layout", "reorder_blockers"]


def _commutes(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when the op gives the same result, permuted, for a channel-permuted input."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.groups == 1 or m.groups == m.in_channels == m.out_channels
    if node.op in ("call_module", "call_function", "call_method"):
        return traits_of(node, gm).commutes
    return node.op == "get_attr"


def _maps(u: Any) -> list[np.ndarray]:
    if isinstance(u, np.ndarray):
        return [u]
    if isinstance(u, (tuple, list)):
        return [m for v in u for m in _maps(v)]
    return []


def reorder_blockers(analysis: Analysis) -> dict[int, str]:
    """Groups (by index) that must keep their original channel order, with the reason."""
    spaces = analysis.spaces
    gid_of = _gid_of_class(analysis)
    blocked: dict[int, str] = {}

    def block(gids: Iterable[int], reason: str) -> None:
        for g in gids:
            if g >= 0:
                blocked.setdefault(int(g), reason)

    for gid, g in enumerate(analysis.groups):
        if g.frozen or g.equal_count:
            blocked[gid] = "frozen" if g.frozen else "feeds a grouped op"
    for node in analysis.gm.graph.nodes:
        if node.meta.get(CHANNELS) is None and node.op != "output":
            continue  # sizes and shapes: unchanged by a permutation
        maps = _maps(node.meta.get(CHANNELS))
        for src in node.all_input_nodes:
            maps += _maps(src.meta.get(CHANNELS))
        touched = []
        for m in maps:
            flat = spaces.unit_class[m.reshape(-1)]
            gids = gid_of[flat]
            touched.append(gids)
            if flat.size < 2:
                continue
            for gg in np.unique(gids[gids >= 0]).tolist():
                where = np.flatnonzero(gids == gg)
                if where[-1] - where[0] + 1 != where.size:
                    block([gg], f"not one block of channels at '{node.name}'")
                elif np.unique(flat[where]).size != where.size:
                    block([gg], f"a channel repeats at '{node.name}'")
        if node.op in ("placeholder", "output") or not touched:
            continue
        if not _commutes(node, analysis.gm):
            block(np.unique(np.concatenate(touched)), f"positional op at '{node.name}'")
    return blocked


def _gid_of_class(analysis: Analysis) -> np.ndarray:
    gid_of = np.full(len(analysis.spaces.unit_class), -1, dtype=np.int64)
    for cls, (gid, _) in analysis.spaces.class_index.items():
        gid_of[cls] = gid
    return gid_of


@dataclass(frozen=True)
class GroupOrder:
    """What reordering did for one group: how many consumer subsets became contiguous."""

    group: str
    channels: int
    sets: int
    contiguous: int
    identity_contiguous: int
    exact: bool


@dataclass
class Layout:
    """Which original channel positions each rewritten tensor holds, in order.

    ``rank[c]`` is the new position of unit class ``c`` within its (reordered) group, -1 where
    the group keeps its original order.
    """

    keep_unit: np.ndarray
    unit_class: np.ndarray
    rank: np.ndarray | None = None
    gid_of: np.ndarray | None = None
    orders: list[GroupOrder] = field(default_factory=list)
    blocked: Mapping[int, str] = field(default_factory=dict)

    def positions(self, u: np.ndarray) -> np.ndarray:
        """Kept positions of a channel map (flattened along its channel dim), in new order."""
        flat = np.asarray(u).reshape(-1)
        pos = np.flatnonzero(self.keep_unit[flat])
        if self.rank is None or pos.size < 2:
            return pos
        cls = self.unit_class[flat[pos]]
        r = self.rank[cls]
        moved = r >= 0
        if not moved.any():
            return pos
        key = pos.copy()
        gids = self.gid_of[cls]
        for g in np.unique(gids[moved]).tolist():
            sel = moved & (gids == g)
            key[sel] = pos[sel].min()
        return pos[np.lexsort((np.where(moved, r, 0), key))]


def channel_layout(
    analysis: Analysis,
    plan: Plan,
    keep_unit: np.ndarray,
    table: Mapping[str, Consumer] | None = None,
    *,
    reorder: bool = True,
    max_sets: int | None = 64,
) -> Layout:
    """The layout of the rewritten model: group orders chosen for ``plan``'s consumer subsets.

    A consumer counts for a group when its whole input is that group's channels; its weight is
    the number of elements a gather would copy (kept channels × spatial size).
    """
    unit_class = analysis.spaces.unit_class
    if not reorder or not plan.consumers:
        return Layout(keep_unit, unit_class)
    table = table if table is not None else analysis.consumers
    gid_of = _gid_of_class(analysis)
    blocked = reorder_blockers(analysis)
    rank = np.full(len(unit_class), -1, dtype=np.int64)
    sets: dict[int, list[tuple[np.ndarray, float]]] = {}
    for name, idx in plan.consumers.items():
        c = table[name]
        cls = unit_class[c.units]
        gids = np.unique(gid_of[cls])
        if gids.size != 1 or gids[0] < 0 or int(gids[0]) in blocked:
            continue
        sets.setdefault(int(gids[0]), []).append((cls[list(idx)], float(len(idx) * c.spatial)))
    orders = []
    for gid, members in sorted(sets.items()):
        g = analysis.groups[gid]
        kept_classes = g.classes[keep_unit[g.classes]]  # a class id is its representative unit
        where = {int(c): j for j, c in enumerate(kept_classes.tolist())}
        family = [[where[int(c)] for c in s] for s, _ in members]
        weights = [w for _, w in members]
        o = order_channels(len(kept_classes), family, weights, max_sets=max_sets)
        rank[kept_classes[list(o.perm)]] = np.arange(len(o.perm))
        orders.append(
            GroupOrder(
                g.name,
                len(kept_classes),
                len(family),
                int(sum(o.contiguous)),
                int(sum(is_contiguous(range(len(kept_classes)), s) for s in family)),
                o.exact,
            )
        )
    return Layout(keep_unit, unit_class, rank, gid_of, orders, blocked)
