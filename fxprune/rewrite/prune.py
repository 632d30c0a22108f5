"""The rewrite: apply a Plan to the analysed graph and return a new, smaller GraphModule.

Steps: (1) removed blocks — each add is rewired to its shortcut and the dead branch eliminated;
(2) every weight layer is replaced by a pruned copy (conv/linear/BN/LayerNorm/GroupNorm, depthwise
``groups`` updated); (3) parameters used directly in the graph (layer scale, class tokens,
``F.layer_norm`` weights) are sliced along their channel dim; (4) the sizes given to
``view``/``reshape``/``expand``/``new_zeros``-like ops (literals, and ints computed from shape
reads: :mod:`fxprune.analysis.sizes`) get their values under the plan as int literals, and
split sizes, ``chunk`` and channel slices are recomputed for the kept channels; (5) in unconstrained plans, consumers with their own kept inputs read them with a
slice, a gather or a zero-padded read (:mod:`fxprune.unconstrained.reads`), after each group's channels
were put in the order that makes the most of those reads slices (:mod:`fxprune.unconstrained.layout`);
(6) lint, dead-module removal, recompile, and shapes propagated again on the example inputs, so
every node's ``tensor_meta`` describes the pruned graph (later passes read it, not re-run
ShapeProp). The analysed graph is not modified.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from fxprune.analysis.ops import out_of_place
from fxprune.analysis.sizes import SizeExpr, planned_shape
from fxprune.analysis.trace import refresh_shapes
from fxprune.core.channel_units import expand_index, varying_dims
from fxprune.core.errors import PlanError
from fxprune.core.meta import CHANNELS, SIZE_ARGS
from fxprune.rewrite.pruners import lookup_pruner
from fxprune.rewrite.segment import SegmentCost, SegmentInfo, segment
from fxprune.unconstrained.layout import Layout, channel_layout
from fxprune.unconstrained.reads import (
    POLICY_OF_KIND,
    ConsumerRead,
    ReadChooser,
    ReadCost,
    choose_read,
    pad_read,
)

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.analysis.consumers import Consumer
    from fxprune.core.plan import Plan

__all__ = ["RewriteInfo", "apply_plan", "rewrite"]


@dataclass
class RewriteInfo:
    """What the rewrite decided for an unconstrained plan: orders and consumer reads."""

    layout: Layout
    reads: dict[str, ConsumerRead] = field(default_factory=dict)
    #: set when the model carries read tensors as segments (:mod:`fxprune.rewrite.segment`)
    segments: SegmentInfo | None = None
    segment_block: int | None = None
    #: set when consumer reads were padded to a multiple of this many channels (pad_read)
    read_block: int | None = None
    #: the per-segment price the segments were merged under (None: cut at every read boundary)
    segment_cost: SegmentCost | None = None

    def counts(self) -> dict[str, int]:
        """How many consumers read by slice / gather / span / full, and gathered channels."""
        out = {k: 0 for k in ("slice", "gather", "span", "full")}
        for r in self.reads.values():
            out[r.kind] += 1
        out["gathered_channels"] = sum(r.length for r in self.reads.values() if r.kind == "gather")
        return out

    def kinds(self) -> dict[str, str]:
        """Consumer -> read kind; pass as ``reads=`` to rebuild exactly this structure."""
        return {name: r.kind for name, r in sorted(self.reads.items())}


def apply_plan(analysis: Analysis, plan: Plan, **options: Any) -> fx.GraphModule:
    """Build the pruned GraphModule for ``plan`` (validated first); options as :func:`rewrite`."""
    return rewrite(analysis, plan, **options)[0]


def rewrite(
    analysis: Analysis,
    plan: Plan,
    *,
    reorder: bool = True,
    reads: str | Mapping[str, str] = "exact",
    read_cost: ReadCost | ReadChooser | None = None,
    segment_block: int | None = None,
    segment_cost: SegmentCost | None = None,
    read_block: int | None = None,
) -> tuple[fx.GraphModule, RewriteInfo]:
    """The pruned GraphModule and what was decided on the way.

    Every node of the result carries ``tensor_meta`` for its pruned shape (propagated on
    ``analysis.example_inputs``); ``analysis.gm`` is left as it was.

    Args:
        reorder: permute groups' channels so consumer subsets become slices (unconstrained plans).
        reads: how consumers with their own kept inputs read them: "exact" (slice or gather),
            "auto" (cheapest of slice/gather/zero-padded span/full read under ``read_cost``),
            "span", "full" (never copy: read everything, zero columns for dropped inputs),
            "measure" (``read_cost`` is a :class:`~fxprune.unconstrained.reads.ReadChooser`
            that picks among each consumer's candidates, e.g. by timing them); or
            a mapping consumer -> read kind, as recorded in ``RewriteInfo.kinds()`` (so a saved
            model is rebuilt with the reads it was measured with). Choosing among whole-model
            export variants by timing them is :func:`fxprune.measure.export_choice.measured_rewrite`.
        segment_block: carry every tensor that consumers read in channel ranges as segments
            aligned to this block (:func:`fxprune.rewrite.segment.segment`); None: do not.
        segment_cost: with ``segment_block``, cut only where a segment pays for its extra
            convs under this price (:class:`~fxprune.rewrite.segment.SegmentCost`).
        read_block: give every conv of an unconstrained plan an input count that is a
            multiple of this block, so the runtime can keep it in its blocked layout: shared
            tensors keep a few more channels (:func:`fxprune.unconstrained.masks.align_unions`, read
            by nobody) and every read is widened with zero columns
            (:func:`~fxprune.unconstrained.reads.pad_read`). The plan itself is not changed, so
            ``rebuild`` needs the same ``read_block`` (compile records it). Not with
            ``reads="measure"``.
    """
    plan.validate(analysis)
    if read_block is not None and reads == "measure":
        raise ValueError("read_block is a read policy of its own: not with reads='measure'")
    if read_block is not None and plan.consumers:
        from fxprune.unconstrained.masks import align_unions

        plan = align_unions(analysis, plan, read_block)
    gm = copy.deepcopy(analysis.gm)
    keep_unit = analysis.spaces.keep_units(plan.kept)
    table = analysis.consumers if plan.consumers else None
    layout = channel_layout(analysis, plan, keep_unit, table, reorder=reorder)
    info = RewriteInfo(layout, read_block=read_block)
    _remove_blocks(gm, analysis, plan.removed_blocks)
    _prune_layers(gm, analysis, plan, layout, _ReadPolicy(reads, read_cost, read_block), info)
    _slice_parameters(gm, analysis, layout)
    _rewrite_counts(gm, analysis, keep_unit)
    _finish(gm, analysis.example_inputs)
    if segment_block is not None:
        gm, info.segments = segment(gm, analysis.example_inputs, segment_block, segment_cost)
        info.segment_block, info.segment_cost = segment_block, segment_cost
    return gm, info


@dataclass(frozen=True)
class _ReadPolicy:
    """How consumers read their own kept inputs: ``rewrite``'s reads, read_cost, read_block."""

    reads: str | Mapping[str, str]
    cost: ReadCost | ReadChooser | None
    block: int | None

    def policy(self, node: str) -> str:
        """The read policy for one consumer (a recorded read kind maps to its policy)."""
        if isinstance(self.reads, str):
            return self.reads
        return POLICY_OF_KIND[self.reads.get(node, "gather")]


def _remove_blocks(gm: fx.GraphModule, analysis: Analysis, removed_blocks: Iterable[str]) -> None:
    """Rewire each removed block's add to its shortcut and eliminate the dead branch."""
    nodes = {n.name: n for n in gm.graph.nodes}
    replaced: dict[str, str] = {}  # removed add -> the node now standing for it
    removed = set(removed_blocks)
    for block in analysis.blocks:  # graph order, so chained and nested blocks resolve
        if block.name not in removed:
            continue
        shortcut = block.shortcut
        while shortcut in replaced:
            shortcut = replaced[shortcut]
        add = nodes[block.name]
        for user in list(add.users):
            _out_of_place(gm, user)
        add.replace_all_uses_with(nodes[shortcut])
        gm.graph.erase_node(add)
        replaced[block.name] = shortcut
    gm.graph.eliminate_dead_code()
    # what dead-code elimination keeps because it may have effects (an assert on the branch's
    # shape) goes with the branch it reads
    region = {n for b in analysis.blocks if b.name in removed for n in b.region}
    for node in reversed(list(gm.graph.nodes)):
        if node.name in region and not node.users and node.op not in ("placeholder", "output"):
            gm.graph.erase_node(node)


def _prune_layers(
    gm: fx.GraphModule,
    analysis: Analysis,
    plan: Plan,
    layout: Layout,
    policy: _ReadPolicy,
    info: RewriteInfo,
) -> None:
    """Replace every live weight layer by its pruned copy; consumers get their reads.

    Each module is pruned once (a module called twice is one layer), and modules that shared a
    parameter (tied weights) share its pruned version. The reads go to ``info.reads``.
    """
    nodes = {n.name: n for n in gm.graph.nodes}  # the live ones, after block removal
    done: set[str] = set()
    tied: dict[int, nn.Parameter] = {}
    for rec in analysis.spaces.layers:
        if rec.node not in nodes or rec.target in done:
            continue
        done.add(rec.target)
        in_idx, out_idx = layout.positions(rec.in_units), layout.positions(rec.out_units)
        read = None
        if rec.node in plan.consumers:
            consumer = analysis.consumers[rec.node]
            read = _consumer_read(
                gm,
                consumer,
                plan.consumers[rec.node],
                in_idx,
                out_idx,
                policy.policy(rec.node),
                policy.cost,
                policy.block,
            )
            info.reads[rec.node] = read
            in_idx = in_idx[read.local]
        unchanged = _identity(in_idx, rec.in_units) and _identity(out_idx, rec.out_units)
        if unchanged and (read is None or not read.zero.any()):
            continue
        try:
            module = gm.get_submodule(rec.target)
        except AttributeError:
            continue  # functional layer (F.layer_norm): its parameters are sliced below
        new = _pruned(module, rec.target, in_idx, out_idx, read)
        for pname, value in list(new.named_parameters(recurse=False)):
            setattr(new, pname, tied.setdefault(id(getattr(module, pname)), value))
        _set_submodule(gm, rec.target, new)
        if read is not None:
            _insert_read(gm, nodes[rec.node], consumer.dim, read)


def _slice_parameters(gm: fx.GraphModule, analysis: Analysis, layout: Layout) -> None:
    """Slice the parameters the graph uses directly (layer scales, class tokens) to the layout."""
    for root in analysis.spaces.roots:
        if root.kind == "param":
            idx = layout.positions(root.units)
            if not _identity(idx, root.units):
                assert root.dim is not None  # ChannelContext.root records it
                _slice_parameter(gm, root.name, idx, root.dim)


def _rewrite_counts(gm: fx.GraphModule, analysis: Analysis, keep_unit: np.ndarray) -> None:
    """Recompute channel counts (view sizes, splits, chunks, slices) for the kept ones."""
    analysed = {n.name: n for n in analysis.gm.graph.nodes}
    maps = {name: n.meta.get(CHANNELS) for name, n in analysed.items()}
    for node in list(gm.graph.nodes):
        src = analysed.get(node.name)
        if src is not None and src.meta.get(SIZE_ARGS):
            _rewrite_sizes(gm, node, src, keep_unit)
        _rewrite_args(node, maps, keep_unit)


def _rewrite_sizes(gm: fx.GraphModule, node: fx.Node, src: fx.Node, keep_unit: np.ndarray) -> None:
    """Give every size argument of ``node`` its value under the plan where it would differ.

    The value is the size of ``node``'s output in the pruned model (:func:`planned_shape`, from
    the analysed node ``src``); an argument is replaced by it, as an int literal, when the
    argument would compute another value in the pruned model: a literal on a pruned dim, or an
    int read off a pruned tensor (which may have been pruned along a different group than the
    one this output carries, or not be pruned while this one is). ``-1`` stays ``-1``.
    """
    want = planned_shape(src, keep_unit)
    for slot in src.meta[SIZE_ARGS]:
        if isinstance(slot.value, tuple):
            got = [v.value(keep_unit) for v in slot.value]
            if got == [want[d] for d in slot.dims]:
                continue
            old = _get_arg(node, slot.where)
            with gm.graph.inserting_before(node):
                items = tuple(
                    want[d]
                    if g != want[d]
                    else gm.graph.call_method("size", (old, i))
                    if slot.like
                    else gm.graph.call_function(operator.getitem, (old, i))
                    for i, (g, d) in enumerate(zip(got, slot.dims, strict=True))
                )
            if slot.like:  # x.reshape_as(y) -> x.reshape(<y's sizes, pruned ones as literals>)
                node.target, node.args, node.kwargs = slot.like, (node.args[0], *items), {}
            else:
                _set_arg(node, slot.where, items)
            continue
        (d,) = slot.dims
        got = slot.value.value(keep_unit) if isinstance(slot.value, SizeExpr) else slot.value
        if got != -1 and got != want[d]:
            _set_arg(node, slot.where, want[d])


def _get_arg(node: fx.Node, where: tuple[Any, ...]) -> Any:
    value = node.args if where[0] == "args" else node.kwargs
    for key in where[1:]:
        value = value[key]
    return value


def _set_arg(node: fx.Node, where: tuple[Any, ...], value: Any) -> None:
    """Replace the argument at ``where`` (a :class:`SizeSlot` path) by ``value``."""
    kind, key, *rest = where
    container = list(node.args) if kind == "args" else dict(node.kwargs)
    if rest:
        seq = container[key]
        items = list(seq)
        items[rest[0]] = value
        container[key] = type(seq)(items) if isinstance(seq, (list, tuple)) else items
    else:
        container[key] = value
    if kind == "args":
        node.args = tuple(container)
    else:
        node.kwargs = container


def _finish(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Lint, drop unused modules, recompile, and make every ``tensor_meta`` the pruned shape."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    refresh_shapes(gm, example_inputs)


def channel_copies(gm: fx.GraphModule) -> tuple[int, int]:
    """How many ``index_select`` (gathers) and ``narrow`` (slices) along dim 1 ``gm`` runs."""
    gathers = slices = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and len(node.args) > 1 and node.args[1] == 1:
            gathers += node.target is torch.index_select
            slices += node.target is torch.narrow
    return gathers, slices


def _identity(idx: np.ndarray, units: np.ndarray) -> bool:
    return idx.size == np.asarray(units).size and bool(np.all(idx == np.arange(idx.size)))


def _pruned(
    module: nn.Module,
    target: str,
    in_idx: np.ndarray,
    out_idx: np.ndarray,
    read: ConsumerRead | None = None,
) -> nn.Module:
    """The module shrunk to these channels, with zero weight columns where ``read`` says."""
    pruner = lookup_pruner(module)
    if pruner is None:
        raise PlanError(f"No pruner registered for {type(module).__name__} '{target}'.")
    new = pruner(module, in_idx, out_idx)
    if read is not None and read.zero.any():
        with torch.no_grad():
            new.weight[:, torch.from_numpy(np.flatnonzero(read.zero))] = 0.0
    return new


def _consumer_read(
    gm: fx.GraphModule,
    consumer: Consumer,
    kept: tuple[int, ...],
    in_idx: np.ndarray,
    out_idx: np.ndarray,
    policy: str,
    cost: ReadCost | ReadChooser | None,
    block: int | None = None,
) -> ConsumerRead:
    """Where the consumer's kept inputs sit in its rewritten input, and how it reads them.

    ``policy="measure"`` hands the candidate reads (each with its pruned consumer) to ``cost``
    (a :class:`~fxprune.unconstrained.reads.ReadChooser`), which picks one.
    """
    local = np.flatnonzero(np.isin(in_idx, np.asarray(kept, dtype=np.int64)))
    sizes = {"spatial": consumer.spatial, "macs_per_input": consumer.macs_per_input}
    if policy != "measure":
        if isinstance(cost, ReadChooser):
            raise ValueError("a ReadChooser read_cost (e.g. MeasuredReads) needs reads='measure'")
        read = choose_read(local, in_idx.size, policy=policy, cost=cost, **sizes)
        return pad_read(read, in_idx.size, block) if block else read
    if not isinstance(cost, ReadChooser):
        raise ValueError(
            "reads='measure' needs a ReadChooser read_cost, e.g. MeasuredReads(backend)"
        )
    candidates: dict[str, ConsumerRead] = {}
    for p in ("exact", "span", "full"):
        r = choose_read(local, in_idx.size, policy=p, **sizes)
        candidates.setdefault(r.kind, r)
    module = gm.get_submodule(consumer.target)
    shape = list(consumer.in_shape)
    shape[consumer.dim] = in_idx.size
    units = {
        kind: (r, _pruned(module, consumer.target, in_idx[r.local], out_idx, r))
        for kind, r in candidates.items()
    }
    return cost.choose(consumer.node, tuple(shape), consumer.dim, units)


def _insert_read(gm: fx.GraphModule, node: fx.Node, dim: int, read: ConsumerRead) -> None:
    """Feed ``node`` a slice or gather of its input (a full read needs nothing)."""
    if read.kind == "full":
        return
    x = node.args[0]
    with gm.graph.inserting_before(node):
        if read.kind in ("slice", "span"):
            new = gm.graph.call_function(torch.narrow, (x, dim, read.start, read.length))
        else:
            name = f"_fxprune_read_{node.name}"
            gm.register_buffer(name, torch.from_numpy(read.local.astype(np.int64)))
            index = gm.graph.get_attr(name)
            new = gm.graph.call_function(torch.index_select, (x, dim, index))
    node.args = (new, *node.args[1:])


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make an in-place op out-of-place.

    The add wrote a fresh tensor; its shortcut is a tensor autograd still needs (e.g. the
    previous ReLU's output), so an in-place ReLU that used to modify the add's result must not
    modify the shortcut.
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False):
            module = copy.deepcopy(module)
            module.inplace = False
            _set_submodule(gm, node.target, module)
    elif node.kwargs.get("inplace", False):
        node.kwargs = {**node.kwargs, "inplace": False}
    elif (twin := out_of_place(node)) is not None:
        node.target = twin


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, module)


def _slice_parameter(gm: fx.GraphModule, target: str, idx: np.ndarray, dim: int) -> None:
    """Keep the positions ``idx`` of a parameter along ``dim`` (the dim its units label)."""
    parent_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(parent_name) if parent_name else gm
    value = getattr(owner, attr)
    sliced = value.detach().index_select(dim, torch.from_numpy(idx.astype(np.int64))).clone()
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
    else:
        owner.register_buffer(attr, sliced) if attr in owner._buffers else setattr(
            owner, attr, sliced
        )


def _keep_along(u: Any, keep_unit: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(channel dim, 1-D keep mask) of a channel map, or None if nothing there is pruned."""
    if not isinstance(u, np.ndarray):
        return None
    dims = varying_dims(u)
    if not dims:
        return None
    mask = keep_unit[u.reshape(-1)]
    return None if mask.all() else (dims[0], mask)


def _rewrite_args(node: fx.Node, maps: dict[str, Any], keep_unit: np.ndarray) -> None:
    target = node.target
    if (node.op == "call_method" and target in ("split", "chunk", "tensor_split")) or (
        node.op == "call_function" and target in (torch.split, torch.chunk, torch.tensor_split)
    ):
        src = node.args[0]
        got = _keep_along(maps.get(src.name), keep_unit)
        outs = maps.get(node.name)
        if got is None or not isinstance(outs, tuple):
            return
        cdim, _ = got
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % outs[0].ndim
        if dim != cdim:
            return
        # the source varies along ``dim``, so each piece's map is exactly its channels (a piece
        # of one channel included: it is empty when that channel is pruned)
        sizes = [int(keep_unit[u.reshape(-1)].sum()) for u in outs]
        node.args, node.kwargs = (src, sizes, dim), {}
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
    elif node.op == "call_function" and target is torch.nn.functional.layer_norm:
        got = _keep_along(maps.get(node.name), keep_unit)
        if got is not None:
            args = list(node.args)
            args[1] = [int(got[1].sum())]
            node.args = tuple(args)
    elif node.op == "call_function" and target is torch.nn.functional.scaled_dot_product_attention:
        _keep_attention_scale(node, maps)
    elif (
        node.op == "call_function"
        and target is operator.getitem
        and isinstance(node.args[1], (tuple, slice))
    ):
        _rewrite_slice(node, maps, keep_unit)


def _keep_attention_scale(node: fx.Node, maps: dict[str, Any]) -> None:
    """Pass scaled-dot-product attention its original scale explicitly.

    Its default scale is ``1/sqrt(E)`` of the query's last dim, which pruning shrinks; the
    masked model keeps the dense ``E`` (zeroed channels add nothing to the scores), so the
    pruned one must keep its scale too. Set whenever the query carries channels, pruned or not
    in this plan, so that one graph form serves every plan.
    """
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    if len(node.args) > 6 or node.kwargs.get("scale") is not None:
        return
    query = node.args[0] if node.args else node.kwargs.get("query")
    u = maps.get(query.name) if isinstance(query, fx.Node) else None
    if not isinstance(u, np.ndarray) or u.ndim == 0 or u.shape[-1] == 1:
        return
    kwargs = {names[i]: a for i, a in enumerate(node.args)}
    kwargs.update(node.kwargs)
    kwargs["scale"] = 1.0 / math.sqrt(u.shape[-1])
    node.args, node.kwargs = (), kwargs


def _rewrite_slice(node: fx.Node, maps: dict[str, Any], keep_unit: np.ndarray) -> None:
    src, index = node.args
    got = _keep_along(maps.get(src.name), keep_unit)
    if got is None:
        return
    cdim, mask = got
    expanded = expand_index(index, maps[src.name].ndim)
    d = 0
    for pos, i in enumerate(expanded):
        if i is None:
            continue
        if d == cdim and isinstance(i, slice):
            start, stop, _ = i.indices(len(mask))
            expanded[pos] = slice(int(mask[:start].sum()), int(mask[:stop].sum()))
        d += 1
    node.args = (src, tuple(expanded))
