"""Peak activation memory as solver rows: one linear row per live set.

The peak (:mod:`fxprune.analysis.liveness`: the largest set of activations alive at one node
of the execution order) is a max over nodes, so ``peak ≤ M`` holds iff every node's live set
is at most ``M`` bytes: one row per live set, exact, no max in the MILP. A live set's bytes
are linear in the kept counts: a tensor of shape ``(N, C, H, W)`` whose channel dim reads
group ``g`` holds ``N·H·W·itemsize`` bytes per kept channel. A tensor whose channel dim reads
several groups, a slice, or frozen channels (a concatenation, a flatten) holds that many bytes
per *kept position*: per option of each group, the positions it keeps (exact, as
:func:`~fxprune.pipeline.problem.keep_mask` is deterministic), the frozen ones a constant.
Rows whose live set lies within another's are dropped (they can never bind).

**Removed blocks.** A removed residual branch's tensors vanish: a group inside the block keeps
count 0, and a tensor in the branch that reads only outside groups is gated off with the block
(``OpCost.block``). The block's add goes too, and its users read the shortcut instead, which
then lives until their last use. So in a live set holding both the add's output and its
shortcut, the add's output is gated with its block (the shortcut is counted already); in one
holding the add's output alone it is kept, standing for the shortcut of the same channels.
Then each row of a surviving node is exactly that node's live set in the pruned model, and a
row of a removed node (in the branch, or the add) is at most the row of the surviving node
just before it (everything in it other than the branch was produced before and is read
after), so the predicted peak is the pruned model's counted peak, removed blocks included.

The rows price the solved (constrained) plan. An unconstrained export adds channel copies
(gathers) whose tensors they do not see; compile checks every limit again on the counted model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fxprune.analysis.liveness import activation_bytes, buffer_of, live_sets
from fxprune.core.meta import CHANNELS, TENSOR_META
from fxprune.solver import OpCost, Resource, Row

if TYPE_CHECKING:
    from torch import fx

    from fxprune.analysis import Analysis

__all__ = ["ACTIVATION_BYTES", "activation_resource"]

#: the resource's name (``CompileConfig.max_activation_bytes``)
ACTIVATION_BYTES = "activation_bytes"

#: a live activation as a row sees it: its buffer's node name, and the block it is gated with
_Item = tuple[str, str | None]


def activation_resource(
    analysis: Analysis,
    axes: Any,
    block_groups: Mapping[str, tuple[str, ...]],
    limit: float,
) -> Resource:
    """The peak-activation resource of ``analysis``'s graph: one row per maximal live set.

    ``axes`` (:class:`~fxprune.pipeline.problem._Axes`) says which problem groups a tensor's
    channel positions read and what each option keeps of them; ``block_groups`` names the
    removable blocks of the problem.
    """
    graph = analysis.gm.graph
    nodes = {n.name: n for n in graph.nodes}
    block_of_node = {n: b for b in block_groups for n in analysis.block(b).region}
    rows = _maximal(
        [
            _items(alive, block_of_node, block_groups, analysis, nodes)
            for _, alive in live_sets(graph)
        ]
    )
    priced: dict[_Item, tuple[list[OpCost], float]] = {}
    out = []
    for row in rows:
        ops: list[OpCost] = []
        const = 0.0
        for item in sorted(row, key=lambda i: (i[0], i[1] or "")):
            if item not in priced:
                priced[item] = _terms(nodes[item[0]], axes, item[1])
            more, c = priced[item]
            ops.extend(more)
            const += c
        out.append(Row(tuple(ops), const))
    first, *more_rows = out or [Row(())]
    return Resource(ACTIVATION_BYTES, first.ops, float(limit), first.const, tuple(more_rows))


def _items(
    alive: tuple[fx.Node, ...],
    block_of_node: Mapping[str, str],
    block_groups: Mapping[str, tuple[str, ...]],
    analysis: Analysis,
    nodes: Mapping[str, fx.Node],
) -> frozenset[_Item]:
    """One live set as row items: each buffer with the block that gates it (see the module
    doc: a branch tensor with its block; a removable block's add when its shortcut is live)."""
    names = {b.name for b in alive}
    items = set()
    for b in alive:
        block = block_of_node.get(b.name)
        if block is None and b.name in block_groups:  # a removable block's add
            shortcut = buffer_of(nodes[analysis.block(b.name).shortcut])
            if shortcut is not None and shortcut.name in names:
                block = b.name
        items.add((b.name, block))
    return frozenset(items)


def _maximal(rows: list[frozenset[_Item]]) -> list[frozenset[_Item]]:
    """The rows not contained in another (in first-seen order); equal rows kept once."""
    unique = list(dict.fromkeys(rows))
    by_size = sorted(unique, key=len, reverse=True)
    kept: list[frozenset[_Item]] = []
    for row in by_size:
        if not any(row <= other for other in kept):
            kept.append(row)
    keep = set(kept)
    return [r for r in unique if r in keep]


def _terms(node: fx.Node, axes: Any, block: str | None) -> tuple[list[OpCost], float]:
    """One buffer's bytes as ops over the groups it reads (bytes per option) plus a constant;
    gated with ``block`` when given (its constant then becomes a gated op too)."""
    per_group: dict[str, np.ndarray] = defaultdict(lambda: 0.0)
    const = 0.0
    for meta, units in _tensors(node.meta.get(TENSOR_META), node.meta.get(CHANNELS)):
        nbytes = activation_bytes(meta)
        if not _labels(units, tuple(meta.shape)):
            const += nbytes  # no channel map: it does not shrink
            continue
        per_position = nbytes / units.size
        reads, fixed = axes.reads(units.ravel())
        const += per_position * fixed
        for name, idx in reads.items():
            per_group[name] = per_group[name] + per_position * np.asarray(axes.shares(name, idx))
    ops = [
        OpCost(f"{node.name}:{name}", None, name, np.asarray(t, float).reshape(1, -1), block)
        for name, t in sorted(per_group.items())
    ]
    if block is not None and const:
        ops.append(OpCost(f"{node.name}:fixed", None, None, np.array([[const]]), block))
        const = 0.0
    return ops, const


def _tensors(meta: Any, channels: Any) -> Iterator[tuple[Any, Any]]:
    """(tensor_meta, channel map or None) of each tensor of a value (a tuple's in turn)."""
    if hasattr(meta, "shape"):
        yield meta, channels if isinstance(channels, np.ndarray) else None
    elif isinstance(meta, (tuple, list)):
        same = isinstance(channels, (tuple, list)) and len(channels) == len(meta)
        for i, m in enumerate(meta):
            yield from _tensors(m, channels[i] if same else None)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from _tensors(m, None)


def _labels(units: Any, shape: tuple[int, ...]) -> bool:
    """Whether a channel map labels a tensor of ``shape`` (broadcast along every other dim)."""
    return (
        isinstance(units, np.ndarray)
        and units.ndim == len(shape)
        and all(u in (1, s) for u, s in zip(units.shape, shape, strict=True))
    )
