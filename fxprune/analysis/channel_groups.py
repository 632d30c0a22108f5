"""Channel-space analysis: label every tensor's channels with units, then form coupling groups.

Walks the graph once in topological order; each node's rule (``channel_rules.py``) maps its
inputs' channel maps to its output's, joining units that must be pruned together. Unknown ops
freeze what they touch. Afterwards the units are grouped: a *coupling group* is a connected set
of roots (conv/linear outputs, parameters) that share unit classes; its *indices* are its unit
classes in a canonical order. A Plan chooses, per group, which indices to keep.

Ints computed from shape reads are followed on the way (:mod:`fxprune.analysis.sizes`): one read
off a channel dim may only become a size the rewrite sets, else its channels freeze.

Results: ``node.meta["fxprune.channels"]`` for every tensor node, ``node.meta["fxprune.sizes"]``
for every int computed from shape reads, and a :class:`ChannelSpaces`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from fxprune.analysis.channel_context import (
    ChannelContext,
    LayerRecord,
    RootRecord,
    describe,
    is_tensor_node,
)
from fxprune.analysis.channel_rules import DEFAULT_ATTENTION, lookup_rule
from fxprune.analysis.ops import traits_of
from fxprune.analysis.sizes import check_size_uses, size_value
from fxprune.core.channel_units import varying_dims
from fxprune.core.meta import CHANNELS, SIZES, TENSOR_META

log = logging.getLogger(__name__)

__all__ = ["ChannelSpaces", "Group", "analyze_channels"]


@dataclass(frozen=True)
class Group:
    """A coupling group: ``size`` indices, each a class of units kept or pruned as one."""

    name: str
    size: int
    classes: np.ndarray  # class id (unit representative) of each index
    roots: tuple[str, ...]
    frozen: tuple[str, ...] = ()  # reasons; non-empty means never pruned
    inexact: tuple[str, ...] = ()  # reasons pruning differs from masking
    #: each entry: G arrays of group indices (with repeats) whose kept counts must be equal
    equal_count: tuple[tuple[np.ndarray, ...], ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.frozen


@dataclass
class ChannelSpaces:
    """The result of the channel-space pass."""

    gm: fx.GraphModule
    ctx: ChannelContext
    groups: list[Group]
    unit_class: np.ndarray  # unit id -> class id
    class_index: dict[int, tuple[int, int]] = field(default_factory=dict)  # class -> (group, idx)

    @property
    def layers(self) -> list[LayerRecord]:
        return self.ctx.layers

    @property
    def roots(self) -> list[RootRecord]:
        return self.ctx.roots

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def groups_of(self, units: np.ndarray) -> list[int]:
        """Indices (into ``groups``) of the groups that own any of these units."""
        classes = np.unique(self.unit_class[units])
        return sorted({self.class_index[c][0] for c in classes.tolist() if c in self.class_index})

    def keep_units(self, kept: dict[str, np.ndarray]) -> np.ndarray:
        """Per-unit keep flags from per-group kept index arrays (groups not named keep all)."""
        keep_class = np.ones(len(self.unit_class), dtype=bool)
        for g in self.groups:
            if g.name in kept:
                mask = np.ones(g.size, dtype=bool)
                mask[np.asarray(kept[g.name], dtype=np.int64)] = False
                keep_class[g.classes[mask]] = False
        return keep_class[self.unit_class]


def _get_attr_map(ctx: ChannelContext, node: fx.Node) -> np.ndarray | None:
    value = ctx.gm
    for atom in str(node.target).split("."):
        value = getattr(value, atom)
    if not isinstance(value, torch.Tensor):
        return None
    if value.ndim == 0:
        return ctx.single((), f"scalar parameter '{node.target}'")
    cdim = _paired_dim(ctx, node, tuple(value.shape))
    if cdim is None:
        cdim = max(range(value.ndim), key=lambda d: (value.shape[d], d))
    return ctx.root(node, str(node.target), "param", value.shape[cdim], cdim, value.ndim)


def _paired_dim(ctx: ChannelContext, node: fx.Node, shape: tuple[int, ...]) -> int | None:
    """The dim of a parameter that a user lines up with another operand's channel dim, or None
    when no user decides it.

    Elementwise (``x + pos_embed``: ``(B, N, C)`` with a ``(1, N, C)`` table): the dim that
    broadcasts against the other operand's channel dim, ``C``, not the longer ``N`` — the
    longest dim would tie all of that tensor's channels into one. A matrix product ``x @ W``
    with ``x``'s channels on its last dim: ``W``'s dim ``-2``, the one contracted with them
    (``W @ x`` with ``x``'s on its dim ``-2``: ``W``'s last).
    """
    for user in node.users:
        traits = traits_of(user, ctx.gm)
        if not (traits.binary or traits.matmul):
            continue
        for pos, other in enumerate(user.args[:2] if traits.matmul else ctx.tensor_args(user)):
            u, s = ctx.map(other), ctx.shape(other)
            if other is node or u is None or s is None:
                continue
            dims = varying_dims(u.reshape((1,) * (len(s) - u.ndim) + u.shape))
            if len(dims) != 1:
                continue
            if traits.matmul:  # this parameter is the operand other than ``pos``
                contracted = len(s) - 1 if pos == 0 else len(s) - 2
                d = len(shape) - 2 if pos == 0 else len(shape) - 1
                if dims[0] == contracted and len(shape) >= 2 and shape[d] == s[contracted]:
                    return d
                continue
            d = len(shape) - len(s) + dims[0]
            if 0 <= d < len(shape) and shape[d] == s[dims[0]]:
                return d
    return None


def _waits_for_a_user(ctx: ChannelContext, node: fx.Node) -> bool:
    """A parameter table with an elementwise or matrix-product user whose other operand comes
    later in the graph: its channel dim is chosen when that user is reached (:func:`_paired_dim`)."""
    meta = node.meta.get(TENSOR_META)
    if meta is None or len(getattr(meta, "shape", ())) < 2:
        return False
    for user in node.users:
        traits = traits_of(user, ctx.gm)
        if (traits.binary or traits.matmul) and any(
            a is not node and CHANNELS not in a.meta for a in user.all_input_nodes
        ):
            return True
    return False


def analyze_channels(gm: fx.GraphModule, attention: str = DEFAULT_ATTENTION) -> ChannelSpaces:
    """Run the channel-space pass on a traced GraphModule with ``tensor_meta`` set.

    ``attention`` is what a multi-head split offers (:data:`~fxprune.analysis.channel_rules.ATTENTION`).
    Under ``"heads"``, a split whose heads end in a frozen group (Swin's and LeViT's bias tables
    gathered by index are added to the scores with no channels to drop per head) is split by its
    longest dim instead, and the pass runs again: heads where they can be pruned, head-dim
    positions elsewhere. Under ``"auto"`` it goes the other way: positions first, and a split
    whose positions end in a frozen group (an interleaved rotary embedding picks every other
    position, which no consistent subset survives) is cut into whole heads and the pass runs
    again, splits not yet tried as heads before any gives up (q's heads freeze v's positions
    through attention until v's split is cut into heads too); a split whose heads still freeze
    then goes back to positions for good. Each run settles at least one split, so this ends.
    """
    no_heads: frozenset[str] = frozenset()
    heads_at: frozenset[str] = frozenset()
    while True:
        spaces = _analyze_once(gm, attention, no_heads, heads_at)
        ctx = spaces.ctx
        # under "auto", splits not yet tried as heads go first: when q and k are cut into
        # heads and v is not, attention ties q's heads to v's positions and freezes both, so
        # v's split (frozen only now) must be tried as heads before q's and k's give up
        frozen = _frozen_splits(spaces, ctx.position_splits) - no_heads - heads_at
        if frozen:
            log.debug("multi-head splits cut into whole heads, their positions froze: %s", frozen)
            heads_at |= frozen
            continue
        frozen = _frozen_splits(spaces, ctx.head_splits)
        if not frozen:
            return spaces
        no_heads |= frozen


def _frozen_splits(spaces: ChannelSpaces, splits: dict[str, np.ndarray]) -> set[str]:
    """The splits some of whose output units are in a frozen group."""
    return {
        name
        for name, units in splits.items()
        if any(spaces.groups[g].frozen for g in spaces.groups_of(units.reshape(-1)))
    }


def _analyze_once(
    gm: fx.GraphModule, attention: str, no_heads: frozenset[str], heads_at: frozenset[str]
) -> ChannelSpaces:
    ctx = ChannelContext(gm, attention, no_heads, heads_at)
    for node in gm.graph.nodes:
        node.meta.pop(CHANNELS, None)  # a parameter may wait for a later node (below)
    for node in gm.graph.nodes:
        for a in node.all_input_nodes:
            if a.op == "get_attr" and CHANNELS not in a.meta:  # one that waited for its user
                a.meta[CHANNELS] = _get_attr_map(ctx, a)
        if node.op == "get_attr" and _waits_for_a_user(ctx, node):
            continue
        node.meta[CHANNELS] = _visit(ctx, node)
    check_size_uses(ctx)  # sizes read off channel dims go only where the rewrite sets them
    return _form_groups(ctx)


def _visit(ctx: ChannelContext, node: fx.Node):
    if node.op == "placeholder":
        shape = ctx.shape(node)
        return None if shape is None else ctx.single(shape, f"model input '{node.name}'")
    if node.op == "get_attr":
        return _get_attr_map(ctx, node)
    if node.op == "output":
        ctx.freeze_args(node, "model output")
        return None
    if not is_tensor_node(node):
        # sizes, shapes, asserts: the sizes pass follows the ints computed from shape reads
        try:
            node.meta[SIZES] = size_value(ctx, node)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            node.meta[SIZES] = None  # a form the pass does not follow: its uses are not sizes
        return None
    rule = lookup_rule(node, ctx.gm)
    result = None
    if rule is not None:
        try:
            result = rule(ctx, node)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            result = None  # an argument form the rule does not handle: treat as unknown
    if result is None:
        reason = f"unsupported op: {describe(node, ctx.gm)}"
        ctx.freeze_args(node, reason)
        result = ctx.frozen_output(node, reason)
    return result


def _lone_channels(ctx: ChannelContext, unit_class: np.ndarray) -> dict[int, list[str]]:
    """Unit classes that some tensor holds as its only channel, with the reasons to freeze them.

    A channel map that varies along no dim says "nothing here is pruned", and the rules and the
    rewrite read it so: a broadcast leaves the tensor alone, a squeeze, a view or a split keeps
    its literal sizes. That holds for a tensor whose unit is frozen or stands for a whole tensor
    (pruning it empties every layer that reads it, which a plan may not do), but not for
    ``y[:, k:k+1]``: pruning channel ``k`` empties that tensor alone, and ``y - y[:, k:k+1]``
    fails to broadcast, while the masking oracle, which never changes a shape, computes on.

    So a class is frozen where a used tensor *selects* it alone, whatever the tensor is used
    for: its map is one unit out of an input's larger map, and it has fewer elements than that
    input (a slice, a split piece; not a reshape, which keeps every element). And where
    ``ChannelContext.combine`` broadcast a tensor of one unit (``ctx.lone``). Only in groups of
    two or more indices: a group of one can be emptied only inside a removed block, where
    nothing runs.
    """
    lone: dict[int, list[str]] = {}

    def add(unit: int, reason: str) -> None:
        c = int(unit_class[unit])
        if c not in ctx.table.frozen and reason not in lone.setdefault(c, []):
            lone[c].append(reason)

    for node in ctx.gm.graph.nodes:
        u = node.meta.get(CHANNELS)
        if not isinstance(u, np.ndarray) or u.size != 1 or not node.users:
            continue  # a split's pieces are looked at where getitem takes them, if used
        unit, shape = int(u.flat[0]), ctx.shape(node)
        for src in _sources(node) if shape is not None else []:
            v, src_shape = src.meta[CHANNELS], ctx.shape(src)
            if v.size > 1 and unit in v and math.prod(shape) < math.prod(src_shape):
                add(
                    unit,
                    f"{describe(node, ctx.gm)} takes one channel of this group on its own: "
                    "pruning it would leave an empty tensor where the graph broadcasts, "
                    "squeezes or reshapes one channel",
                )
                break
    for unit, reason in ctx.lone:
        add(unit, reason)
    return lone


def _sources(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of ``node``, looking through a tuple (a split) to what it split."""
    inputs = []
    for a in node.all_input_nodes:
        inputs.extend(a.all_input_nodes if isinstance(a.meta.get(CHANNELS), tuple) else [a])
    return [
        a
        for a in inputs
        if isinstance(a.meta.get(CHANNELS), np.ndarray)
        and hasattr(a.meta.get(TENSOR_META), "shape")
    ]


def _form_groups(ctx: ChannelContext) -> ChannelSpaces:
    table = ctx.table
    unit_class = table.find_array(np.arange(len(table), dtype=np.int64))
    lone = _lone_channels(ctx, unit_class)
    # Classes that appear in one root belong to one group: join them with a second union-find.
    owner: dict[int, int] = {}
    parent = list(range(len(ctx.roots)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r, root in enumerate(ctx.roots):
        for c in np.unique(unit_class[root.units]).tolist():
            if c in owner:
                a, b = find(owner[c]), find(r)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[c] = r
    members: dict[int, list[int]] = {}
    for r in range(len(ctx.roots)):
        members.setdefault(find(r), []).append(r)

    groups: list[Group] = []
    class_index: dict[int, tuple[int, int]] = {}
    for rep in sorted(members):
        roots = [ctx.roots[r] for r in members[rep]]
        if not any(r.kind in ("conv", "linear") for r in roots):
            continue  # parameters / opaque values with no layer: nothing to prune
        order: list[int] = []
        seen: set[int] = set()
        for root in roots:
            for c in unit_class[root.units].tolist():
                if c not in seen:
                    seen.add(c)
                    order.append(c)
        gid = len(groups)
        for i, c in enumerate(order):
            class_index[c] = (gid, i)
            for reason in lone.get(c, []) if len(order) > 1 else []:
                table.freeze(np.asarray([c]), reason)
        frozen = sorted({r for c in order for r in table.frozen.get(c, [])})
        inexact = sorted({r for c in order for r in table.inexact.get(c, [])})
        groups.append(
            Group(
                name=next(r.name for r in roots if r.kind in ("conv", "linear")),
                size=len(order),
                classes=np.asarray(order, dtype=np.int64),
                roots=tuple(r.name for r in roots),
                frozen=tuple(frozen),
                inexact=tuple(inexact),
            )
        )
    groups = _attach_equal_count(ctx, groups, unit_class, class_index)
    return ChannelSpaces(ctx.gm, ctx, groups, unit_class, class_index)


def _attach_equal_count(ctx, groups, unit_class, class_index) -> list[Group]:
    """Turn grouped-conv / GroupNorm segment rules into per-group index partitions."""
    extra: dict[int, list[tuple[np.ndarray, ...]]] = {}
    frozen_extra: dict[int, list[str]] = {}
    for units, g, why in ctx.equal_count:
        classes = unit_class[units]
        owners = {class_index[c][0] for c in classes.tolist() if c in class_index}
        if len(owners) != 1:
            for gid in owners:
                frozen_extra.setdefault(gid, []).append(f"{why} spans several groups")
            continue
        gid = owners.pop()
        idx = np.asarray([class_index[c][1] for c in classes.tolist()], dtype=np.int64)
        parts = tuple(np.array_split(idx, g))
        if not any(
            all(np.array_equal(a, b) for a, b in zip(p, parts, strict=False))
            for p in extra.get(gid, [])
        ):
            extra.setdefault(gid, []).append(parts)
    out = []
    for gid, grp in enumerate(groups):
        parts = tuple(extra.get(gid, ()))
        frozen = grp.frozen + tuple(frozen_extra.get(gid, ()))
        if len(parts) > 1 and not frozen:
            frozen = (*frozen, "several different grouped-conv segmentations in one group")
        out.append(Group(grp.name, grp.size, grp.classes, grp.roots, frozen, grp.inexact, parts))
    return out
