"""Sizes computed from shape reads: what they depend on, and where they may go.

Model code reads channel counts off tensors and feeds them back as sizes:
``B, N, C = x.shape; x.permute(0, 2, 1).reshape(B, C, H, W)`` or
``q.reshape(B, N, h, C // h)``. In the pruned model such a read returns the *pruned* count of
the tensor it reads, which need not be the count the reshaped tensor has (PVT's
``sr(x).reshape(B, C, -1)`` reads ``C`` off the block input, while ``sr``'s output channels are a
group of their own), and a count used as a *value* (``x * C ** -0.5``, ``C == self.dim``)
changes what the model computes, which masking never does.

This pass follows every int the graph computes from shape reads (``x.shape``, ``x.size(d)``,
``x.numel()``, items and slices of them, ``+``, ``-``, ``*``, ``//`` and negation, with python
ints) as a :class:`SizeExpr` (``node.meta[SIZES]``): its value in the analysed model, the
channel units of every dim it reads (a dim is read *on channels* when the tensor's channel map
varies along it) and how to evaluate it on pruned counts. Then it looks at every use of a value
that reads channels:

- as a size argument of an op the op table says takes its output's sizes
  (:class:`~fxprune.analysis.ops.SizeArgs`: ``view``, ``reshape``, ``expand``, ``new_zeros``,
  ``torch.zeros``, ``unflatten``, ...): allowed. The op's size slots are recorded
  (``node.meta[SIZE_ARGS]``) and the rewrite writes into each the size that the op's *output*
  channel map gives under the plan (:func:`planned_shape`): the kept count of its units on a
  pruned dim, the analysed size on every other dim. The plan fixes every count, so each is an
  int literal; it is exact by construction (the map lays the units out over the data as the op
  moves them) and adds no coupling. A multi-head split ``reshape(B, N, h, C // h)`` is exact
  for the same reason: the reshape rule joins the units at one position of every head
  (:func:`fxprune.core.channel_units.normalize`), so every count the group can take keeps
  ``h`` heads of equal width and ``C // h`` never has to divide unevenly. Under
  ``attention="heads"`` (and at the splits ``"auto"`` cuts into heads) the rule joins the
  positions of one head instead: the planned sizes
  are the kept head count and the unchanged width (``h`` and ``C // h`` are written as those
  literals where they would compute other values).
- anything else (a comparison, ``arange``, a scale, a slice bound, a true division, an op
  fxprune does not know): the units it reads are frozen, and the reason names the op and its
  module path. fxprune never prunes what it cannot prove.

A size op whose sizes cannot be read (a size that is not an int literal or an int this pass
follows, or sizes that do not match the analysed output shape) freezes its output's channels:
the rewrite could not set them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx

from fxprune.analysis.channel_context import ChannelContext, describe
from fxprune.analysis.ops import SizeArgs, entry_for
from fxprune.core.meta import CHANNELS, SIZE_ARGS, SIZES, TENSOR_META

__all__ = [
    "SizeExpr",
    "SizeSlot",
    "check_size_uses",
    "planned_shape",
    "size_value",
]

#: python int arithmetic a size may go through and stay a known function of the counts it reads
_ARITHMETIC: dict[Any, str] = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.floordiv: "//",
    operator.neg: "-",
}

_NO_UNITS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class SizeExpr:
    """An int the graph computes from shape reads.

    Attributes:
        dense: its value in the analysed model.
        text: how it is computed, for reasons (``"size 2 of 'norm1'" // 2``).
        read: for a read of one dim on channels, that dim's units (with repeats: each position).
        fn, args: otherwise, the arithmetic that computes it from other sizes and ints.
    """

    dense: int
    text: str
    read: np.ndarray | None = None
    fn: Callable[..., int] | None = None
    args: tuple[SizeExpr | int, ...] = ()

    @property
    def units(self) -> np.ndarray:
        """The channel units of every dim it reads (unique; empty if it reads none)."""
        parts = [self.read] if self.read is not None else []
        parts += [a.units for a in self.args if isinstance(a, SizeExpr)]
        return np.unique(np.concatenate(parts)) if parts else _NO_UNITS

    @property
    def on_channels(self) -> bool:
        """Whether it reads a dim that carries channels (pruning may change it)."""
        return self.units.size > 0

    def value(self, keep_unit: np.ndarray) -> int:
        """Its value in a model pruned to ``keep_unit``, where each dim it reads on channels
        has the kept count of its units."""
        if self.read is not None:
            return int(keep_unit[self.read].sum())
        if self.fn is None:
            return self.dense
        return self.fn(*(a.value(keep_unit) if isinstance(a, SizeExpr) else a for a in self.args))


SizeValue = SizeExpr | tuple[SizeExpr, ...]


@dataclass(frozen=True)
class SizeSlot:
    """One size argument of an op: where it sits and which output dims it gives.

    ``where`` is ``("args", i)`` / ``("kwargs", name)``, with a third item ``j`` for the j-th
    element of a sequence there. ``dims`` has one output dim for an int, one per element for a
    shape-valued node. ``value`` is the argument as analysed: an int literal, or the size(s) it
    computes. ``like`` is set when the argument is a tensor whose shape the op takes: the method
    the op becomes when the rewrite has to give its sizes explicitly.
    """

    where: tuple[Any, ...]
    dims: tuple[int, ...]
    value: int | SizeExpr | tuple[SizeExpr, ...]
    like: str | None = None


# ---- following sizes -------------------------------------------------------------------------
def _const(value: int, text: str | None = None) -> SizeExpr:
    return SizeExpr(int(value), text if text is not None else str(value))


def _dim_read(ctx: ChannelContext, x: fx.Node, d: int) -> SizeExpr:
    """``x.shape[d]``: on channels when ``x``'s map varies along ``d``."""
    shape = ctx.shape(x)
    u = ctx.map(x)
    text = f"size {d} of '{x.name}'"
    if u is None or u.ndim > len(shape):
        return _const(shape[d], text)
    u = u.reshape((1,) * (len(shape) - u.ndim) + u.shape)
    if u.shape[d] == 1:
        return _const(shape[d], text)
    read = np.moveaxis(u, d, 0).reshape(u.shape[d], -1)[:, 0].copy()
    return SizeExpr(shape[d], text, read=read)


def _shape_read(ctx: ChannelContext, x: Any) -> tuple[SizeExpr, ...] | None:
    if not isinstance(x, fx.Node) or ctx.shape(x) is None:
        return None
    return tuple(_dim_read(ctx, x, d) for d in range(len(ctx.shape(x))))


def _operand(a: Any) -> Any:
    """A size operand: an int, a followed size (or tuple of them), a tuple of those; else None."""
    if isinstance(a, bool):
        return None
    if isinstance(a, int):
        return a
    if isinstance(a, fx.Node):
        return a.meta.get(SIZES)
    if isinstance(a, (list, tuple)):
        items = [_operand(v) for v in a]
        if any(v is None or isinstance(v, tuple) for v in items):
            return None
        return tuple(v if isinstance(v, SizeExpr) else _const(v) for v in items)
    return None


def _text(a: SizeExpr | int) -> str:
    return a.text if isinstance(a, SizeExpr) else str(a)


def size_value(ctx: ChannelContext, node: fx.Node) -> SizeValue | None:
    """The size(s) a non-tensor node computes from shape reads, or None if it computes none
    (or computes them in a way this pass does not follow)."""
    target = node.target
    if node.op == "call_function" and target is getattr:
        x, attr = node.args[0], node.args[1]
        if attr == "shape":
            return _shape_read(ctx, x)
        if attr == "ndim" and ctx.shape(x) is not None:
            return _const(len(ctx.shape(x)))
        return None
    if node.op == "call_method" and target in ("size", "dim", "numel"):
        shape = _shape_read(ctx, node.args[0])
        if shape is None:
            return None
        if target == "dim":
            return _const(len(shape))
        if target == "numel":
            return _product(shape, f"numel of '{node.args[0].name}'")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return shape if dim is None else shape[dim] if isinstance(dim, int) else None
    if node.op != "call_function":
        return None
    if target is operator.getitem:
        src, index = node.args
        value = _operand(src)
        if isinstance(value, tuple) and isinstance(index, (int, slice)):
            try:
                return value[index]
            except IndexError:
                return None
        return None
    if target in _ARITHMETIC:
        ops = [_operand(a) for a in node.args]
        if any(v is None for v in ops) or node.kwargs:
            return None
        if all(isinstance(v, tuple) for v in ops) and target is operator.add:
            return ops[0] + ops[1]  # shape concatenation: x.shape[:2] + (C,)
        if any(isinstance(v, tuple) for v in ops):
            return None
        if not any(isinstance(v, SizeExpr) for v in ops):
            return None
        dense = target(*(v.dense if isinstance(v, SizeExpr) else v for v in ops))
        sym = _ARITHMETIC[target]
        text = f"-{_text(ops[0])}" if len(ops) == 1 else f"({_text(ops[0])} {sym} {_text(ops[1])})"
        return SizeExpr(int(dense), text, fn=target, args=tuple(ops))
    return None


def _product(items: tuple[SizeExpr, ...], text: str) -> SizeExpr:
    """``numel``: the product of every size, as a chain of multiplications."""
    expr = _const(1, text)
    for v in items:
        expr = SizeExpr(expr.dense * v.dense, text, fn=operator.mul, args=(expr, v))
    return expr


# ---- where sizes go --------------------------------------------------------------------------
def _size_args(node: fx.Node, gm: fx.GraphModule) -> SizeArgs | None:
    entry = entry_for(node, gm, lambda e: e.traits.size_args is not None)
    return entry.traits.size_args if entry is not None else None


def _slots(ctx: ChannelContext, node: fx.Node, spec: SizeArgs) -> list[SizeSlot] | None:
    """The op's size slots, checked against its analysed output shape; None when they cannot
    be read (the rewrite could not set them)."""
    meta = node.meta.get(TENSOR_META)
    if not hasattr(meta, "shape"):
        return None
    out = tuple(meta.shape)
    if spec.like is not None:  # x.reshape_as(y): the sizes are y's
        other = node.args[spec.index] if len(node.args) > spec.index else None
        value = _shape_read(ctx, other)
        if value is None or tuple(v.dense for v in value) != out:
            return None
        return [SizeSlot(("args", spec.index), tuple(range(len(out))), value, spec.like)]
    first = spec.first_dim
    if spec.dim_arg is not None:
        dim = node.args[spec.dim_arg] if len(node.args) > spec.dim_arg else node.kwargs.get("dim")
        src = node.args[0].meta.get(TENSOR_META) if isinstance(node.args[0], fx.Node) else None
        if not isinstance(dim, int) or not hasattr(src, "shape"):
            return None
        first = dim % len(src.shape)  # unflatten(x, -1, ...): the input's dim, not the output's
    if len(node.args) > spec.index:
        where: tuple[Any, ...] = ("args", spec.index)
        spec_arg = node.args[spec.index]
        spread = spec.varargs and not isinstance(spec_arg, (list, tuple))
        if spread and isinstance(_operand(spec_arg), tuple):
            spread = len(node.args) > spec.index + 1  # x.view(shape) vs x.view(*shape)
        entries = (
            [(("args", i), node.args[i]) for i in range(spec.index, len(node.args))]
            if spread
            else [(where, spec_arg)]
        )
    elif spec.name in node.kwargs:
        entries = [(("kwargs", spec.name), node.kwargs[spec.name])]
    else:
        return None
    slots: list[SizeSlot] = []
    dim = first
    for where, a in entries:
        if isinstance(a, (list, tuple)):
            for j, v in enumerate(a):
                slot = _slot((*where, j), dim, v, out)
                if slot is None:
                    return None
                slots.append(slot)
                dim += 1
            continue
        value = _operand(a)
        if isinstance(value, tuple):
            dims = tuple(range(dim, dim + len(value)))
            if dims and dims[-1] >= len(out):
                return None
            if any(v.dense != out[d] for v, d in zip(value, dims, strict=True)):
                return None
            slots.append(SizeSlot(where, dims, value))
            dim += len(value)
            continue
        slot = _slot(where, dim, a, out)
        if slot is None:
            return None
        slots.append(slot)
        dim += 1
    if spec.dim_arg is None and dim != len(out):
        return None
    return slots


def _slot(where: tuple[Any, ...], dim: int, a: Any, out: tuple[int, ...]) -> SizeSlot | None:
    value = _operand(a)
    if dim >= len(out) or value is None or isinstance(value, tuple):
        return None
    dense = value.dense if isinstance(value, SizeExpr) else value
    if dense != out[dim] and not (dense == -1 and not isinstance(value, SizeExpr)):
        return None
    return SizeSlot(where, (dim,), value)


def _occurrences(value: Any, where: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], fx.Node]]:
    """Every node in a (nested) argument, with its path."""
    if isinstance(value, fx.Node):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            yield from _occurrences(v, (*where, j))
    elif isinstance(value, slice):
        for j, v in enumerate((value.start, value.stop, value.step)):
            yield from _occurrences(v, (*where, "slice", j))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _occurrences(v, (*where, k))


def _on_channels(value: Any) -> np.ndarray:
    if isinstance(value, SizeExpr):
        return value.units
    if isinstance(value, tuple):
        parts = [v.units for v in value if isinstance(v, SizeExpr)]
        return np.unique(np.concatenate(parts)) if parts else _NO_UNITS
    return _NO_UNITS


def check_size_uses(ctx: ChannelContext) -> None:
    """Record every size op's slots and freeze the channels of sizes used for anything else.

    Runs after the channel walk, before groups are formed (so the freezes count). Sizes that
    go through arithmetic are checked where the arithmetic's result is used.
    """
    gm = ctx.gm
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module", "output"):
            continue
        spec = _size_args(node, gm) if node.op != "output" else None
        slots = _slots(ctx, node, spec) if spec is not None else None
        allowed: set[tuple[Any, ...]] = set()
        if spec is not None:
            if slots is None:
                _unreadable(ctx, node)
            else:
                node.meta[SIZE_ARGS] = tuple(slots)
                allowed = {s.where for s in slots}
        follows = node.meta.get(SIZES) is not None  # arithmetic / getitem on sizes
        occurrences = [
            *(o for i, v in enumerate(node.args) for o in _occurrences(v, ("args", i))),
            *(o for k, v in node.kwargs.items() for o in _occurrences(v, ("kwargs", k))),
        ]
        for where, src in occurrences:
            if follows or where in allowed:
                continue
            units = _on_channels(src.meta.get(SIZES))
            if units.size:
                text = _describe_value(src.meta[SIZES])
                ctx.freeze(
                    units,
                    f"{describe(node, gm)} uses {text}, a size read off a channel dim, "
                    "for something other than the size of a view / reshape / expand / "
                    "new tensor: pruning would change its value",
                )


def _describe_value(value: SizeValue) -> str:
    if isinstance(value, SizeExpr):
        return value.text
    return "(" + ", ".join(v.text for v in value) + ")"


def _unreadable(ctx: ChannelContext, node: fx.Node) -> None:
    """A size op whose sizes the rewrite could not set: freeze its output's channels and the
    channels of any size it is given."""
    why = (
        f"{describe(node, ctx.gm)} takes sizes fxprune cannot follow (not int literals or "
        "sizes computed from shape reads): the rewrite could not set them"
    )
    u = node.meta.get(CHANNELS)
    if isinstance(u, np.ndarray) and u.size > 1:
        ctx.freeze(u, why)
    for _, src in _occurrences(tuple(node.args) + tuple(node.kwargs.values()), ()):
        units = _on_channels(src.meta.get(SIZES))
        if units.size:
            ctx.freeze(units, why)


def planned_shape(node: fx.Node, keep_unit: np.ndarray) -> tuple[int, ...]:
    """The shape of ``node``'s output in a model pruned to ``keep_unit``: on every dim its
    channel map varies along, the kept count of the units there; elsewhere, the analysed size."""
    shape = list(node.meta[TENSOR_META].shape)
    u = node.meta.get(CHANNELS)
    if not isinstance(u, np.ndarray) or u.ndim > len(shape):
        return tuple(shape)
    u = u.reshape((1,) * (len(shape) - u.ndim) + u.shape)
    for d in range(len(shape)):
        if u.shape[d] > 1:
            along = np.moveaxis(u, d, 0).reshape(u.shape[d], -1)[:, 0]
            shape[d] = int(keep_unit[along].sum())
    return tuple(shape)
