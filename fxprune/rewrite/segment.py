"""Segmented tensors: unconstrained exports in which no op ever cuts a tensor along channels.

After reordering, a consumer with its own kept inputs reads a contiguous range of a shared
tensor (a ``narrow``). In eager PyTorch at batch 1 that is a free view; on ONNX Runtime CPU it
is not: convolutions run in a blocked channel layout (NCHWc), a Slice or Gather on channels is
not a blocked op, so the optimizer converts the whole tensor out of the blocked layout and the
kept part back in, so a read can cost about what reading the whole tensor would
(``bench/segmented_reads.py`` measures it). The copies can then eat what the pruned inputs
save, while an export whose consumers read everything (zero weight columns, no copy) pays
none of them.

This pass removes the cut instead of paying for it. A *region* is a set of tensors joined by
channel-wise ops (BN, activations, adds and multiplies, depthwise convs, pooling, flatten to
``[N, C]``): in a pruned graph, a coupling group. The reads of a region (``narrow`` along
channels) define its *segments*: the ranges between consecutive read boundaries. Every tensor of
the region is then carried as one tensor per segment:

- a producer conv/linear is emitted as one conv per segment (its output rows);
- a channel-wise op runs once per segment (BN and depthwise convs with their channels sliced);
- a consumer conv/linear becomes the sum of one partial conv per segment it reads (ONNX
  Runtime fuses the sum into the blocked conv, ``NchwcConvSumFusion``); a gather read becomes
  a read of every segment with zero weight columns for what it drops (no copy), and so does a
  region that only gathers read (one segment);
- a ``torch.cat`` along channels takes the segments as they are; anything else that needs the
  whole tensor gets one ``torch.cat`` of the segments.

The result computes the same function (summation order aside) and exports to ONNX like any
GraphModule. Whether it is faster is the runtime's call: it trades every copy for more, smaller
convs. Cut at every read boundary, a residual network gets many narrow segments and several
times as many convs as with exact reads, and the extra launches can cost more than the copies
they replace. With a :class:`SegmentCost` (the backend's measured price of one more conv and of
a multiply-add), :func:`_merge` keeps only the cuts that pay for their convs, every consumer of
a merged segment reading it whole with zero columns. ``rewrite(reads="measure")`` times the
result against the other reads and keeps it when it wins, or ties with fewer copies. Segments
should be multiples of the runtime's channel block (e.g. 8 or 16 on ONNX Runtime CPU,
depending on the CPU's vector width; ask ``backend.layout_block()``), or the partial convs
leave the blocked layout: plans rounded with ``multiple=``/``align=`` give such boundaries.
Regions whose tensors come from anything but a conv or linear (an input, a parameter, an
unknown op) are left alone.
"""

from __future__ import annotations

import copy
import itertools
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from fxprune.analysis.ops import traits_of
from fxprune.analysis.std_conv import StdConv2d
from fxprune.analysis.trace import refresh_shapes
from fxprune.core.meta import TENSOR_META
from fxprune.rewrite.pruners import lookup_pruner

__all__ = ["SegmentCost", "SegmentInfo", "segment"]


@dataclass(frozen=True)
class SegmentCost:
    """What one more segment costs, to decide which read boundaries are worth a cut.

    Each segment of a region costs one conv per producer and per depthwise conv, and one
    partial conv per consumer that reads into it (``launch_s`` each); a consumer also pays
    ``mac_s`` per multiply-accumulate for every channel of every segment it touches, including
    the zero columns up to the segment's ends. Cutting at every read boundary (no cost model)
    can leave segments a single channel block wide, and on a runtime where a conv launch is
    worth millions of multiply-adds such a segment saves far less than its convs cost. Measure
    the prices with :func:`fxprune.measure.probes.measure_segment_cost`.
    """

    launch_s: float
    #: per multiply-accumulate of the whole batch (a model at batch 8 counts 8× the MACs)
    mac_s: float


@dataclass(frozen=True)
class _RegionRead:
    """One read of a region: its channel range (None: a gather, which reads every segment)."""

    span: tuple[int, int] | None
    layers: int  # conv/linear users of the read (one partial layer each, per segment touched)
    macs_per_channel: int  # what one read channel costs those users, in multiply-accumulates

    def touches(self, a: int, b: int) -> bool:
        return self.span is None or (self.span[0] < b and self.span[1] > a)


def _merge(edges: list[int], reads: list[_RegionRead], fixed: int, cost: SegmentCost) -> list[int]:
    """The sub-list of ``edges`` (first and last kept) that minimises the region's modelled cost.

    A dynamic programme over the boundaries: the cost of a segment ``[a, b)`` depends only on
    ``a``, ``b`` and the reads that overlap it, so the best cut ending at each boundary extends
    the best cut ending at an earlier one. ``fixed`` counts the ops emitted once per segment
    whatever reads it (producers, depthwise convs).
    """

    def price(a: int, b: int) -> float:
        touching = [r for r in reads if r.touches(a, b)]
        launches = fixed + sum(r.layers for r in touching)
        macs = (b - a) * sum(r.macs_per_channel for r in touching)
        return cost.launch_s * launches + cost.mac_s * macs

    best = [0.0] + [np.inf] * (len(edges) - 1)
    back = [0] * len(edges)
    for j in range(1, len(edges)):
        for i in range(j):
            total = best[i] + price(edges[i], edges[j])
            if total < best[j]:
                best[j], back[j] = total, i
    out, j = [edges[-1]], len(edges) - 1
    while j:
        j = back[j]
        out.append(edges[j])
    return out[::-1]


def _macs_per_channel(read: fx.Node, gm: fx.GraphModule) -> int:
    """Multiply-accumulates one input channel of ``read`` costs its conv/linear users.

    The whole batch counts: a conv launch costs the same at batch 8, its multiply-adds 8 times
    as much, so larger batches make finer segments pay.
    """
    total = 0
    for user in read.users:
        m = gm.get_submodule(str(user.target))
        out = _shape(user) or ()
        if isinstance(m, nn.Conv2d):
            positions = out[0] * int(np.prod(out[2:])) * int(np.prod(m.kernel_size))
        else:
            positions = int(np.prod(out[:-1]))
        total += m.weight.shape[0] * positions
    return total


@dataclass
class SegmentInfo:
    """What :func:`segment` did: per segmented region, its channel count and boundaries."""

    regions: list[dict] = field(default_factory=list)
    #: narrow reads that became segment lists, gather reads that became zero-column full reads
    reads: dict[str, int] = field(default_factory=lambda: {"narrow": 0, "gather": 0})
    #: nodes that needed the whole tensor back (one ``torch.cat`` each)
    materialised: list[str] = field(default_factory=list)

    @property
    def segments(self) -> int:
        return sum(len(r["bounds"]) - 1 for r in self.regions)


@dataclass
class _Pieces:
    """A tensor carried as segments: new nodes, and for each the consumer columns it feeds.

    ``cols[i][j]`` is the input column (of the consumer that will read these pieces) that
    position ``j`` of piece ``i`` feeds, or -1 for a position the consumer does not read.
    """

    nodes: list[fx.Node]
    cols: list[np.ndarray]


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get(TENSOR_META) if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channels(node: fx.Node) -> int | None:
    """The channel count of a 2-D ``[N, C]`` or 4-D ``[N, C, H, W]`` tensor, else None."""
    s = _shape(node)
    return s[1] if s is not None and len(s) in (2, 4) else None


def _is_layer(m: nn.Module) -> bool:
    """A layer that is a sum over its input columns (not a standardised-weight conv, whose
    partial layers would each standardise over their own columns)."""
    if isinstance(m, StdConv2d):
        return False
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1


def _aligned_args(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node] | None:
    """The tensor args that share the output's channels, or None if ``node`` is not channel-wise.

    An arg of size 1 along channels (or a scalar) is broadcast to every channel and so shared by
    every segment; any other arg must hold the same channels as the output.
    """
    c = _channels(node)
    if c is None:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    traits = traits_of(node, gm)
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        ok = traits.channelwise or _is_depthwise(m)
        if isinstance(m, nn.Flatten):
            ok = m.start_dim == 1 and m.end_dim == -1 and _flattens_to_channels(node)
        return tensors[:1] if ok and _channels(tensors[0]) == c else None
    if traits.binary and node.op in ("call_function", "call_method"):
        aligned = []
        for a in tensors:
            s = _shape(a)
            if s is None or len(s) != len(_shape(node)) or s[1] not in (1, c):
                return None
            if s[1] == c and c > 1:
                aligned.append(a)
        return aligned or None
    unary = traits.channelwise and node.op in ("call_function", "call_method")
    if not unary or not tensors or _channels(tensors[0]) != c:
        return None
    if node.target in (torch.flatten, "flatten") and not _flattens_to_channels(node):
        return None
    if node.target in (torch.mean, "mean") and not _reduces_spatial(node):
        return None
    return tensors[:1]


def _flattens_to_channels(node: fx.Node) -> bool:
    """A flatten of ``[N, C, 1, 1]`` into ``[N, C]``: channels stay where they are."""
    src = node.args[0]
    s = _shape(src) if isinstance(src, fx.Node) else None
    if node.op == "call_module":
        start = 1
    else:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return (
        s is not None and len(s) == 4 and s[2] * s[3] == 1 and start == 1 and _shape(node) == s[:2]
    )


def _reduces_spatial(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    return len(_shape(node.args[0])) == 4 and sorted(d % 4 for d in dims) == [2, 3]


def _read_kind(node: fx.Node) -> str | None:
    """The kind of channel read ``node`` is ("narrow" / "gather"), if only conv/linear use it."""
    if node.op != "call_function" or not node.users:
        return None
    if node.target is torch.narrow and node.args[1] == 1:
        kind = "narrow"
    elif node.target is torch.index_select and node.args[1] == 1:
        index = node.args[2]
        if not (isinstance(index, fx.Node) and index.op == "get_attr"):
            return None
        kind = "gather"
    else:
        return None
    return kind if all(_layer_user(u, node) for u in node.users) else None


def _layer_user(user: fx.Node, arg: fx.Node) -> bool:
    gm_module = getattr(user.graph, "owning_module", None)
    if user.op != "call_module" or gm_module is None or user.args[:1] != (arg,):
        return False
    return _is_layer(gm_module.get_submodule(str(user.target)))


class _Regions:
    """Union-find over nodes joined by channel-wise ops."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def segment(
    gm: fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    block: int = 1,
    cost: SegmentCost | None = None,
) -> tuple[fx.GraphModule, SegmentInfo]:
    """A copy of ``gm`` in which every region read in channel ranges is carried as segments.

    ``gm`` is a pruned model (:func:`fxprune.prune`), typically an unconstrained one with reads
    by ``narrow``/``index_select``; it is not modified. A model with no such reads comes back
    as an unchanged copy.

    Shapes are read from the nodes' ``tensor_meta``, which the rewrite keeps current; a graph
    that never had shapes propagated (e.g. one re-traced after loading) is propagated on
    ``example_inputs`` first. The segmented result's ``tensor_meta`` describes its own nodes.

    Args:
        block: segment boundaries are snapped outwards to multiples of this (the runtime's
            channel block, :meth:`OnnxRuntimeBackend.layout_block`); a read then also covers
            the few neighbouring channels up to the boundary, with zero weight columns.
        cost: cut a region only at the read boundaries that pay for themselves under this
            model (:class:`SegmentCost`, :func:`_merge`); None cuts at every boundary.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    gm = copy.deepcopy(gm)
    if not _has_shapes(gm):
        refresh_shapes(gm, example_inputs)
    info = SegmentInfo()
    regions, aligned = _regions(gm)
    bounds, reads = _region_reads(gm, regions, block)
    chosen = _choose_segments(gm, regions, aligned, bounds, reads, cost, info)
    if not chosen:
        return gm, info
    segments = {n: chosen[regions.find(n)] for n in regions.parent if regions.find(n) in chosen}
    out = _Rewriter(gm, segments, aligned, info).run()
    refresh_shapes(out, example_inputs)  # the pieces, partial convs and sums are new nodes
    return out, info


def _has_shapes(gm: fx.GraphModule) -> bool:
    """Whether shapes were ever propagated through ``gm`` (its inputs carry ``tensor_meta``)."""
    return all(TENSOR_META in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def _regions(gm: fx.GraphModule) -> tuple[_Regions, dict[fx.Node, list[fx.Node]]]:
    """The regions of ``gm``, and each channel-wise node's args that share its channels."""
    regions = _Regions()
    aligned: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        args = _aligned_args(node, gm)
        if args is not None:
            aligned[node] = args
            for a in args:
                regions.union(node, a)
    return regions, aligned


def _region_reads(
    gm: fx.GraphModule, regions: _Regions, block: int
) -> tuple[dict[fx.Node, set[int]], dict[fx.Node, list[_RegionRead]]]:
    """Per region root, its read boundaries snapped to ``block`` and its reads.

    A narrow cuts its region at its (snapped) ends, a gather at nowhere.
    """
    bounds: dict[fx.Node, set[int]] = {}
    reads: dict[fx.Node, list[_RegionRead]] = {}
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        kind = _read_kind(node)
        if kind is None or not (src in regions.parent or _is_producer(src, gm)):
            continue
        cuts = bounds.setdefault(regions.find(src), set())
        span = None
        if kind == "narrow":
            start, end = int(node.args[2]), int(node.args[2]) + int(node.args[3])
            cuts.update((start // block * block, min(_channels(src), -(-end // block) * block)))
            span = (start, end)
        reads.setdefault(regions.find(src), []).append(
            _RegionRead(span, len(node.users), _macs_per_channel(node, gm))
        )
    return bounds, reads


def _choose_segments(
    gm: fx.GraphModule,
    regions: _Regions,
    aligned: dict[fx.Node, list[fx.Node]],
    bounds: dict[fx.Node, set[int]],
    reads: dict[fx.Node, list[_RegionRead]],
    cost: SegmentCost | None,
    info: SegmentInfo,
) -> dict[fx.Node, list[tuple[int, int]]]:
    """Per segmentable region root, its segments (recorded in ``info.regions``).

    A region is segmented only if all its tensors have one channel count and come from a
    conv/linear or a channel-wise op; with ``cost``, only the cuts that pay are kept.
    """
    members: dict[fx.Node, list[fx.Node]] = {}
    for n in list(regions.parent):
        members.setdefault(regions.find(n), []).append(n)
    chosen: dict[fx.Node, list[tuple[int, int]]] = {}
    for root, cuts in bounds.items():
        nodes = members[root]
        c = _channels(nodes[0])
        inner = sorted(b for b in cuts if 0 < b < c)
        if c is None or not all(_channels(n) == c for n in nodes):
            continue
        if not all(n in aligned or _is_producer(n, gm) for n in nodes):
            continue  # a tensor of the region comes from an input, a parameter or unknown op
        edges = [0, *inner, c]
        candidates = len(edges) - 1
        if cost is not None:
            fixed = sum(1 for n in nodes if n not in aligned or _depthwise_node(n, gm))
            edges = _merge(edges, reads[root], fixed, cost)
        chosen[root] = list(itertools.pairwise(edges))
        info.regions.append(
            {"region": root.name, "channels": c, "bounds": edges, "candidates": candidates}
        )
    return chosen


def _depthwise_node(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and _is_depthwise(gm.get_submodule(str(node.target)))


def _is_producer(node: object, gm: fx.GraphModule) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and _is_layer(gm.get_submodule(str(node.target)))
    )


class _Rewriter:
    """Builds the segmented graph node by node (old node -> new node or :class:`_Pieces`)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        segments: dict[fx.Node, list[tuple[int, int]]],
        aligned: dict[fx.Node, list[fx.Node]],
        info: SegmentInfo,
    ) -> None:
        self.gm, self.segments, self.aligned, self.info = gm, segments, aligned, info
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node | _Pieces] = {}
        self.whole: dict[fx.Node, fx.Node] = {}  # pieces concatenated back, once per tensor

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self._emit(node)
        out = fx.GraphModule(self.gm, self.graph)
        out.graph.eliminate_dead_code()
        out.graph.lint()
        out.delete_all_unused_submodules()
        out.recompile()
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _whole(self, old: fx.Node) -> fx.Node:
        value = self.env[old]
        if not isinstance(value, _Pieces):
            return value
        if old not in self.whole:
            self.info.materialised.append(old.name)
            self.whole[old] = self.graph.call_function(torch.cat, (list(value.nodes), 1))
        return self.whole[old]

    def _plain(self, a: object) -> object:
        """An argument with segmented tensors concatenated back (for ops that need them whole)."""
        if isinstance(a, fx.Node):
            return self._whole(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._plain(x) for x in a)
        if isinstance(a, dict):
            return {k: self._plain(v) for k, v in a.items()}
        return a

    def _add_module(self, base: str, module: nn.Module) -> str:
        name = base.replace(".", "_")
        i = 0
        while hasattr(self.gm, f"{name}_{i}"):
            i += 1
        self.gm.add_submodule(f"{name}_{i}", module)
        return f"{name}_{i}"

    def _pieces_of(self, old: fx.Node) -> _Pieces:
        value = self.env[old]
        assert isinstance(value, _Pieces), old
        return value

    # -- the ops ---------------------------------------------------------------------------

    def _emit(self, node: fx.Node) -> fx.Node | _Pieces:
        if node.op == "output":
            return self.graph.output(self._plain(node.args[0]))
        src = node.args[0] if node.args else None
        src_value = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(src_value, _Pieces) and _read_kind(node) is not None:
            return self._read(node, src_value)
        if node in self.segments and node not in self.aligned:
            return self._producer(node)
        if node in self.segments:
            return self._channelwise(node)
        if node.op == "call_module" and isinstance(src_value, _Pieces) and _layer_user(node, src):
            return self._consumer(node, src_value)
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim == 1 and isinstance(node.args[0], (list, tuple)):
                parts: list[fx.Node] = []
                for a in node.args[0]:
                    v = self.env[a]
                    parts.extend(v.nodes if isinstance(v, _Pieces) else [self._plain(a)])
                return self.graph.call_function(torch.cat, (parts, 1))
        new = self.graph.node_copy(node, lambda a: self._whole(a))
        return new

    def _read(self, node: fx.Node, src: _Pieces) -> _Pieces:
        """A narrow keeps the segments inside its range; a gather reads every segment."""
        offsets = np.cumsum([0, *(c.size for c in src.cols)])
        if node.target is torch.narrow:
            self.info.reads["narrow"] += 1
            start, length = int(node.args[2]), int(node.args[3])
            keep = [
                i
                for i in range(len(src.nodes))
                if offsets[i] < start + length and offsets[i + 1] > start
            ]
            cols = []
            for i in keep:
                col = np.arange(offsets[i], offsets[i + 1]) - start
                col[(col < 0) | (col >= length)] = -1  # up to a snapped boundary: zero columns
                cols.append(col)
            return _Pieces([src.nodes[i] for i in keep], cols)
        self.info.reads["gather"] += 1
        index = getattr(self.gm, str(node.args[2].target)).cpu().numpy()
        column = np.full(int(offsets[-1]), -1, dtype=np.int64)
        column[index] = np.arange(index.size)
        return _Pieces(
            list(src.nodes),
            [column[offsets[i] : offsets[i + 1]] for i in range(len(src.nodes))],
        )

    def _linear_sum(self, node: fx.Node, inputs: _Pieces | fx.Node, rows: np.ndarray) -> fx.Node:
        """``module(input)[:, rows]`` as a sum of partial layers, one per input piece."""
        module = self.gm.get_submodule(str(node.target))
        if not isinstance(inputs, _Pieces):
            cols = np.arange(module.weight.shape[1])
            inputs = _Pieces([inputs], [cols])
        total = None
        for i, (piece, cols) in enumerate(zip(inputs.nodes, inputs.cols, strict=True)):
            part = _partial(module, rows, cols, bias=i == 0)
            name = self._add_module(f"{node.target}.seg", part)
            term = self.graph.call_module(name, (piece,))
            total = term if total is None else self.graph.call_function(operator.add, (total, term))
        return total

    def _producer(self, node: fx.Node) -> _Pieces:
        src = node.args[0]
        inputs = self.env[src] if isinstance(self.env[src], _Pieces) else self._whole(src)
        outs = [self._linear_sum(node, inputs, np.arange(a, b)) for a, b in self.segments[node]]
        return _Pieces(outs, [np.arange(a, b) for a, b in self.segments[node]])

    def _consumer(self, node: fx.Node, inputs: _Pieces) -> fx.Node:
        module = self.gm.get_submodule(str(node.target))
        return self._linear_sum(node, inputs, np.arange(module.weight.shape[0]))

    def _channelwise(self, node: fx.Node) -> _Pieces:
        ranges = self.segments[node]
        aligned = self.aligned[node]
        module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        outs = []
        for k, (a, b) in enumerate(ranges):

            def arg(x: object, k: int = k) -> object:
                if isinstance(x, fx.Node):
                    return self._pieces_of(x).nodes[k] if x in aligned else self._whole(x)
                return self._plain(x)

            args = tuple(arg(x) for x in node.args)
            kwargs = {key: arg(v) for key, v in node.kwargs.items()}
            if module is not None and any(True for _ in module.parameters(recurse=False)):
                part = _channel_slice(module, np.arange(a, b))
                target = self._add_module(f"{node.target}.seg", part)
                outs.append(self.graph.call_module(target, args, kwargs))
            elif node.op == "call_module":
                outs.append(self.graph.call_module(node.target, args, kwargs))
            elif node.op == "call_method":
                outs.append(self.graph.call_method(node.target, args, kwargs))
            else:
                outs.append(self.graph.call_function(node.target, args, kwargs))
        return _Pieces(outs, [np.arange(a, b) for a, b in ranges])


def _partial(module: nn.Module, rows: np.ndarray, cols: np.ndarray, bias: bool) -> nn.Module:
    """The layer pruned to output ``rows`` and input positions ``cols`` (-1: a zero column).

    The registered pruner does the slicing (as for any pruned layer); only the first partial
    layer of a sum keeps the bias.
    """
    new = _pruner(module)(module, np.where(cols < 0, 0, cols), rows)
    with torch.no_grad():
        new.weight[:, torch.from_numpy(cols < 0)] = 0
    if not bias:
        new.bias = None
    return new


def _channel_slice(module: nn.Module, idx: np.ndarray) -> nn.Module:
    """A per-channel module (BN, depthwise conv) restricted to channels ``idx``."""
    return _pruner(module)(module, idx, idx)


def _pruner(module: nn.Module):
    pruner = lookup_pruner(module)
    if pruner is None:
        raise TypeError(f"no pruner registered for {type(module).__name__}")
    return pruner
