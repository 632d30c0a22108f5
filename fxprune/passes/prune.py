"""The rewrite: apply a Plan to the analysed graph and return a new, smaller GraphModule.

Steps: (1) removed blocks — each add is rewired to its shortcut and the dead branch eliminated;
(2) every weight layer is replaced by a pruned copy (conv/linear/BN/LayerNorm/GroupNorm, depthwise
``groups`` updated); (3) parameters used directly in the graph (layer scale, class tokens,
``F.layer_norm`` weights) are sliced along their channel dim; (4) literal channel counts in
``view``/``reshape``/``expand``, split sizes, ``chunk`` and channel slices are recomputed for the
kept channels; (5) in unconstrained plans, consumers with their own kept inputs read them with a
slice, a gather or a zero-padded read (:mod:`fxprune.passes.reads`), after each group's channels
were put in the order that makes the most of those reads slices (:mod:`fxprune.passes.reorder`);
(6) lint, dead-module removal, recompile. The analysed graph is not modified.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from fxprune.errors import PlanError
from fxprune.meta import CHANNELS
from fxprune.passes.prune_rules import lookup_pruner
from fxprune.passes.reads import (
    POLICY_OF_KIND,
    ConsumerRead,
    MeasuredReads,
    ReadCost,
    choose_read,
    pad_read,
)
from fxprune.passes.reorder import Layout, channel_layout
from fxprune.passes.segment import SegmentCost, SegmentInfo, segment
from fxprune.passes.units import expand_index, varying_dims

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.plan import Plan
    from fxprune.unconstrained import Consumer

__all__ = ["RewriteInfo", "apply_plan", "rewrite"]


@dataclass
class RewriteInfo:
    """What the rewrite decided for an unconstrained plan: orders and consumer reads."""

    layout: Layout
    reads: dict[str, ConsumerRead] = field(default_factory=dict)
    #: with ``reads="measure"``: the whole-model candidates timed side by side, as multiples
    #: of the exact reads (``{"vs_exact": {"measured": r, "segmented": r}, "kept": name}``)
    whole_check: dict[str, Any] = field(default_factory=dict)
    #: set when the model carries read tensors as segments (:mod:`fxprune.passes.segment`)
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
    read_cost: ReadCost | MeasuredReads | None = None,
    segment_block: int | None = None,
    segment_cost: SegmentCost | None = None,
    read_block: int | None = None,
) -> tuple[fx.GraphModule, RewriteInfo]:
    """The pruned GraphModule and what was decided on the way.

    Args:
        reorder: permute groups' channels so consumer subsets become slices (unconstrained plans).
        reads: how consumers with their own kept inputs read them: "exact" (slice or gather),
            "auto" (cheapest of slice/gather/zero-padded span/full read under ``read_cost``),
            "span", "full" (never copy: read everything, zero columns for dropped inputs),
            "measure" (time the candidates on the backend of ``read_cost``, a
            :class:`~fxprune.passes.reads.MeasuredReads`, keep the fastest); or
            a mapping consumer -> read kind, as recorded in ``RewriteInfo.kinds()`` (so a saved
            model is rebuilt with the reads it was measured with). With "measure", the whole
            model is also timed with exact reads and with segmented tensors, and the fastest
            kept (:func:`_check_whole`).
        segment_block: carry every tensor that consumers read in channel ranges as segments
            aligned to this block (:func:`fxprune.passes.segment.segment`); None: do not.
        segment_cost: with ``segment_block``, cut only where a segment pays for its extra
            convs under this price (:class:`~fxprune.passes.segment.SegmentCost`).
        read_block: give every conv of an unconstrained plan an input count that is a
            multiple of this block, so the runtime can keep it in its blocked layout: shared
            tensors keep a few more channels (:func:`fxprune.unconstrained.align_unions`, read
            by nobody) and every read is widened with zero columns
            (:func:`~fxprune.passes.reads.pad_read`). The plan itself is not changed, so
            ``rebuild`` needs the same ``read_block`` (compile records it). Not with
            ``reads="measure"``.
    """
    plan.validate(analysis)
    if read_block is not None and reads == "measure":
        raise ValueError("read_block is a read policy of its own: not with reads='measure'")
    if read_block is not None and plan.consumers:
        from fxprune.unconstrained import align_unions

        plan = align_unions(analysis, plan, read_block)
    gm = copy.deepcopy(analysis.gm)
    maps = {n.name: n.meta.get(CHANNELS) for n in analysis.gm.graph.nodes}
    keep_unit = analysis.spaces.keep_units(plan.kept)
    nodes = {n.name: n for n in gm.graph.nodes}
    table = None
    if plan.consumers:
        from fxprune.unconstrained import consumers

        table = consumers(analysis)
    layout = channel_layout(analysis, plan, keep_unit, table, reorder=reorder)
    info = RewriteInfo(layout, read_block=read_block)

    replaced: dict[str, str] = {}  # removed add -> the node now standing for it
    removed = set(plan.removed_blocks)
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
    live = {n.name for n in gm.graph.nodes}

    done: set[str] = set()
    tied: dict[int, nn.Parameter] = {}
    for rec in analysis.spaces.layers:
        if rec.node not in live or rec.target in done:
            continue
        done.add(rec.target)
        in_idx, out_idx = layout.positions(rec.in_units), layout.positions(rec.out_units)
        read = None
        if rec.node in plan.consumers:
            policy = (
                reads if isinstance(reads, str) else POLICY_OF_KIND[reads.get(rec.node, "gather")]
            )
            read = _consumer_read(
                gm,
                table[rec.node],
                plan.consumers[rec.node],
                in_idx,
                out_idx,
                policy,
                read_cost,
                read_block,
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
            original = getattr(module, pname)
            # modules that shared a parameter (tied weights) share its pruned version too
            setattr(new, pname, tied.setdefault(id(original), value))
        _set_submodule(gm, rec.target, new)
        if read is not None:
            _insert_read(gm, nodes[rec.node], table[rec.node].dim, read)

    for root in analysis.spaces.roots:
        if root.kind == "param":
            idx = layout.positions(root.units)
            if not _identity(idx, root.units):
                _slice_parameter(gm, root.name, idx)

    for node in gm.graph.nodes:
        _rewrite_args(node, maps, keep_unit)

    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if segment_block is not None:
        gm, info.segments = segment(gm, analysis.example_inputs, segment_block, segment_cost)
        info.segment_block, info.segment_cost = segment_block, segment_cost
    elif isinstance(read_cost, MeasuredReads) and reads == "measure":
        return _check_whole(analysis, plan, reorder, read_cost, gm, info)
    return gm, info


def _check_whole(
    analysis: Analysis,
    plan: Plan,
    reorder: bool,
    judge: MeasuredReads,
    gm: fx.GraphModule,
    info: RewriteInfo,
) -> tuple[fx.GraphModule, RewriteInfo]:
    """Time the whole model with exact reads, measured reads and segmented tensors; keep one.

    Each read was chosen by timing a unit, which cannot show everything the model around it
    does (on DenseNet-121 the units picked 19 zero-padded full reads and the model ran 10%
    slower than with exact reads). Segmenting removes every channel cut but adds convs, so its
    boundaries are merged under the backend's measured price of a segment
    (:meth:`MeasuredReads.segment_cost`); cutting at every boundary lost by 10-50% at batch 1
    on ONNX Runtime CPU. The candidates are timed side by side:

    - if one beats the exact reads by ``min_gain / 2``, the one with the fewest channel copies
      (gathers, then slices) among those clear winners measured within ``tie`` of the fastest;
    - otherwise the one with the fewest copies among those measured within ``tie`` of the
      exact reads. Smaller differences are noise here. A copy is memory traffic the runtime
      may price differently elsewhere (another batch size, a GPU); at equal measured speed,
      fewer is the sounder model. Exact reads win a tie (they store the fewest parameters).

    A fourth candidate, ``lean``, spends a latency budget on copies: exact reads, except that
    the gathers whose gather-free read (full or span) the unit timings price cheapest give way
    to it, while the summed extra time stays within ``copy_budget`` of the exact model's
    measured latency (:func:`_lean_kinds`). Without it, a model whose every gather-free read
    costs a little keeps all of its gathers, and reordering alone cannot remove more: it
    already reaches the lower bound for exact reads (three intervals make at most five
    membership patterns), so fewer gathers can only come from reads with zero columns.

    A fifth, ``aligned``, rounds shared tensors up to the backend's channel block and pads
    exact reads to it with zero columns (``rewrite(read_block=)``), so that every conv can
    run in the runtime's blocked layout. On ORT CPU that decided more than copies did: at 30%
    per-layer sparsity the exact export of ResNet-50 ran 48 of its 53 convs in plain NCHW.
    A sixth, ``aligned_lean``, pads ``lean``'s reads the same way: the blocked layout and
    fewer gathers at once (where ``aligned`` wins clearly, ``lean`` alone cannot tie it).

    A close call is measured twice (:meth:`MeasuredReads.runoff`): when a candidate with fewer
    copies than the kept one measured within twice the tie of it, the two are timed again,
    alone and twice as often, and the one with fewer copies is kept if that second look puts
    it within the tie. The first look times up to six models together, and its spread
    (about 2.5% per ratio here) is as large as the tie; on ResNet-50 at 0.3 it put
    ``aligned_lean`` 3.5% behind ``aligned``, whose kernel profile showed 2 ms (4%) more copying
    and layout conversion against about 3.7% fewer multiply-adds.
    """
    exact_gm, exact_info = rewrite(analysis, plan, reorder=reorder, reads="exact")
    candidates: dict[str, tuple[fx.GraphModule, RewriteInfo]] = {"exact": (exact_gm, exact_info)}
    if any(r.kind in ("span", "full") for r in info.reads.values()):
        candidates["measured"] = (gm, info)
    block, cost = judge.segment_block(), judge.segment_cost()
    seg_gm, seg_info = segment(exact_gm, analysis.example_inputs, block, cost)
    if seg_info.regions:
        segmented = dataclasses.replace(
            exact_info, segments=seg_info, segment_block=block, segment_cost=cost
        )
        candidates["segmented"] = (seg_gm, segmented)
    lean = _lean_candidate(analysis, plan, reorder, judge, exact_gm, exact_info, info.kinds())
    if lean is not None:
        candidates["lean"] = lean[:2]
    if block > 1:
        aligned = rewrite(analysis, plan, reorder=reorder, reads="exact", read_block=block)
        if any(r.zero.any() for r in aligned[1].reads.values()):
            candidates["aligned"] = aligned
        if lean is not None:
            padded = rewrite(
                analysis, plan, reorder=reorder, reads=lean[1].kinds(), read_block=block
            )
            if _shapes(padded[0]) != _shapes(lean[0]):  # else the same graph as lean
                candidates["aligned_lean"] = padded
    if len(candidates) == 1:
        return exact_gm, exact_info
    names = list(candidates)
    ratios = dict(
        zip(
            names,
            judge.compare([candidates[n][0] for n in names], analysis.example_inputs),
            strict=True,
        )
    )
    copies = {n: channel_copies(candidates[n][0]) for n in names}
    kept = min(_within_tie(ratios, judge), key=lambda n: (copies[n], n != "exact", ratios[n]))
    runoff = None
    close = [
        n
        for n in names
        if copies[n] < copies[kept] and ratios[n] <= ratios[kept] * (1.0 + 2 * judge.tie)
    ]
    if close:  # fewer copies, just outside the tie: measure the two again, alone
        rival = min(close, key=lambda n: (copies[n], ratios[n]))
        ratio = judge.runoff(candidates[kept][0], candidates[rival][0], analysis.example_inputs)
        runoff = {"kept": kept, "rival": rival, "rival_vs_kept": ratio}
        if ratio <= 1.0 + judge.tie:
            kept = rival
    chosen, chosen_info = candidates[kept]
    chosen_info.whole_check = {
        "vs_exact": {n: ratios[n] for n in names[1:]},
        "copies": {n: dict(zip(("gathers", "slices"), copies[n], strict=True)) for n in names},
        "kept": kept,
        "runoff": runoff,
        "measured_reads": info.counts(),
        "segment_cost": dataclasses.asdict(cost),
    }
    if lean is not None:
        chosen_info.whole_check["lean"] = lean[2]
    return chosen, chosen_info


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _within_tie(ratios: dict[str, float], judge: MeasuredReads) -> list[str]:
    """The candidates :func:`_check_whole` counts as fastest: if one beats exact reads by
    ``min_gain / 2``, the clear winners within ``tie`` of the fastest; else those within
    ``tie`` of exact reads (exact included)."""
    clear = 1.0 - judge.min_gain / 2
    best = min(ratios.values())
    if best <= clear:
        return [n for n, r in ratios.items() if r <= min(clear, best * (1.0 + judge.tie))]
    return [n for n, r in ratios.items() if r <= 1.0 + judge.tie]


def _lean_candidate(
    analysis: Analysis,
    plan: Plan,
    reorder: bool,
    judge: MeasuredReads,
    exact_gm: fx.GraphModule,
    exact_info: RewriteInfo,
    measured: dict[str, str],
) -> tuple[fx.GraphModule, RewriteInfo, dict[str, Any]] | None:
    """The ``lean`` candidate of :func:`_check_whole` and its record, or None if there is none
    (no gather has a timed alternative, or it would equal the measured reads)."""
    if _lean_kinds(exact_info, judge.decisions, math.inf)[0] is None:
        return None
    budget = judge.copy_budget * judge.measure([exact_gm], analysis.example_inputs)[0].median_ms
    kinds, spent = _lean_kinds(exact_info, judge.decisions, budget)
    if kinds is None or kinds == measured:
        return None
    gm, info = rewrite(analysis, plan, reorder=reorder, reads=kinds)
    exact_kinds = exact_info.kinds()
    record = {
        "predicted_extra_ms": spent,
        "budget_ms": budget,
        "replaced": {n: k for n, k in kinds.items() if exact_kinds[n] != k},
    }
    return gm, info, record


def _lean_kinds(
    exact: RewriteInfo, timings: dict[str, dict[str, float]], budget_ms: float
) -> tuple[dict[str, str] | None, float]:
    """Exact reads with the cheapest gathers replaced by gather-free reads, within a budget.

    ``timings`` are the unit figures of :class:`MeasuredReads` (ms per read kind, consumer and
    its pruned layer). Each gather with a timed full read (no copy) or span read (a slice with
    zero columns) gives way to the faster of the two, in increasing order of the extra time
    that read costs its unit, while the summed extra stays within ``budget_ms`` (reads that the
    units timed faster are free). Returns the reads (``None`` when no gather gives way) and
    the extra time spent.
    """
    steps = []
    for name, r in exact.reads.items():
        ms = timings.get(name, {})
        alternatives = [k for k in ("full", "span") if k in ms]
        if r.kind != "gather" or "gather" not in ms or not alternatives:
            continue
        alt = min(alternatives, key=ms.__getitem__)
        steps.append((max(ms[alt] - ms["gather"], 0.0), name, alt))
    kinds, spent = exact.kinds(), 0.0
    for extra, name, alt in sorted(steps):
        if spent + extra > budget_ms:
            break
        kinds[name], spent = alt, spent + extra
    return (kinds if kinds != exact.kinds() else None), spent


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
    cost: ReadCost | MeasuredReads | None,
    block: int | None = None,
) -> ConsumerRead:
    """Where the consumer's kept inputs sit in its rewritten input, and how it reads them.

    ``policy="measure"`` times the candidate reads (each with its pruned consumer) on the
    backend of ``cost`` (a :class:`MeasuredReads`) and keeps the fastest.
    """
    local = np.flatnonzero(np.isin(in_idx, np.asarray(kept, dtype=np.int64)))
    sizes = {"spatial": consumer.spatial, "macs_per_input": consumer.macs_per_input}
    if policy != "measure":
        if isinstance(cost, MeasuredReads):
            raise ValueError("a MeasuredReads read_cost needs reads='measure'")
        read = choose_read(local, in_idx.size, policy=policy, cost=cost, **sizes)
        return pad_read(read, in_idx.size, block) if block else read
    if not isinstance(cost, MeasuredReads):
        raise ValueError("reads='measure' needs read_cost=MeasuredReads(backend)")
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
    elif (
        node.op == "call_method"
        and str(node.target).endswith("_")
        and not str(node.target).endswith("__")
    ):
        node.target = str(node.target)[:-1]
    elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        node.target = _INPLACE_FUNCTIONS[node.target]


_INPLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
    torch.nn.functional.relu_: torch.nn.functional.relu,
}


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, module)


def _slice_parameter(gm: fx.GraphModule, target: str, idx: np.ndarray) -> None:
    parent_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(parent_name) if parent_name else gm
    value = getattr(owner, attr)
    dim = max(range(value.ndim), key=lambda d: (value.shape[d], d))
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
    if (node.op == "call_method" and target in ("view", "reshape", "expand")) or (
        node.op == "call_function" and target is torch.reshape
    ):
        got = _keep_along(maps.get(node.name), keep_unit)
        if got is None:
            return
        cdim, mask = got
        args = list(node.args)
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            sizes = list(args[1])
            if isinstance(sizes[cdim], int) and sizes[cdim] != -1:
                sizes[cdim] = int(mask.sum())
                args[1] = type(args[1])(sizes)
        elif isinstance(args[1 + cdim], int) and args[1 + cdim] != -1:
            args[1 + cdim] = int(mask.sum())
        node.args = tuple(args)
    elif (node.op == "call_method" and target in ("split", "chunk", "tensor_split")) or (
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
    elif (
        node.op == "call_function"
        and target is operator.getitem
        and isinstance(node.args[1], (tuple, slice))
    ):
        _rewrite_slice(node, maps, keep_unit)


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
