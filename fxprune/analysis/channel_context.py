"""The state a channel rule works against while the channel-space pass walks the graph.

Rules (``channel_rules.py``) read the maps of their inputs and produce the map of their output
through this small API, so that they never touch the union-find or ``node.meta`` directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from fxprune.core.channel_units import UnitTable, normalize, varying_dims
from fxprune.core.meta import CHANNELS, MODULE_PATH, TENSOR_META

__all__ = ["ChannelContext", "LayerRecord", "RootRecord", "describe"]


@dataclass(frozen=True)
class RootRecord:
    """Where fresh units were born: a conv/linear output, a parameter, or an opaque source."""

    name: str
    kind: str  # "conv" | "linear" | "param" | "opaque"
    units: np.ndarray  # 1-D, in channel order
    #: the dim of the output (of the parameter, for "param") that these units label
    dim: int | None = None


@dataclass(frozen=True)
class LayerRecord:
    """A weight-bearing module call and the units of its input and output channels."""

    node: str
    target: str
    kind: str  # "conv" | "linear" | "norm"
    in_units: np.ndarray
    out_units: np.ndarray
    groups: int = 1


def describe(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short human description of a node: what it calls and in which module."""
    if node.op == "call_module" and gm is not None:
        what = f"module {type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    elif node.op == "call_function":
        what = f"function {getattr(node.target, '__qualname__', node.target)}"
    else:
        what = f"{node.op} {node.target}"
    path = node.meta.get(MODULE_PATH)
    return f"{what} at node '{node.name}'" + (f" (in '{path}')" if path else "")


def _tensor_metas(meta: Any) -> Iterator[Any]:
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        yield meta
    elif isinstance(meta, (list, tuple)):
        for m in meta:
            yield from _tensor_metas(m)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from _tensor_metas(m)


class ChannelContext:
    """Unit bookkeeping for one graph: roots, layers, constraints, per-module sharing."""

    def __init__(
        self,
        gm: fx.GraphModule,
        attention: str,
        no_heads: frozenset[str] = frozenset(),
        heads_at: frozenset[str] = frozenset(),
    ) -> None:
        self.gm = gm
        #: what a multi-head split offers: ``"head_dim"`` (positions within every head),
        #: ``"heads"`` (whole heads) or ``"auto"`` (positions, whole heads where positions
        #: froze); see :data:`fxprune.analysis.channel_rules.ATTENTION`
        self.attention = attention
        #: reshapes split by their longest dim even under ``"heads"`` (their heads froze)
        self.no_heads = no_heads
        #: under ``"auto"``, the reshapes split into whole heads (their positions froze)
        self.heads_at = heads_at
        #: reshape node -> its output units, for every split collapsed onto its head dim
        self.head_splits: dict[str, np.ndarray] = {}
        #: under ``"auto"``, reshape node -> its output units, for every multi-head split
        #: still split by its longest dim
        self.position_splits: dict[str, np.ndarray] = {}
        self.table = UnitTable()
        self.roots: list[RootRecord] = []
        self.layers: list[LayerRecord] = []
        #: (units of one tensor's channel dim, number of equal segments, reason)
        self.equal_count: list[tuple[np.ndarray, int, str]] = []
        #: (unit, reason): a tensor of this one unit was broadcast; frozen unless the unit's
        #: group has a single index (``channel_groups`` decides once the groups are known)
        self.lone: list[tuple[int, str]] = []
        self._module_units: dict[tuple[str, str], np.ndarray] = {}
        self._weight_owner: dict[int, str] = {}

    def whole_heads(self, name: str) -> bool:
        """Whether the multi-head split at reshape ``name`` is cut into whole heads."""
        if name in self.no_heads:
            return False
        return self.attention == "heads" or (self.attention == "auto" and name in self.heads_at)

    def key(self, node: fx.Node, module: torch.nn.Module) -> str:
        """Sharing key of a layer: modules that share a weight tensor (tied weights) share units,
        like repeated calls of one module do."""
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return self._weight_owner.setdefault(id(weight), str(node.target))
        return str(node.target)

    # ---- reading the graph -------------------------------------------------------------
    def shape(self, arg: Any) -> tuple[int, ...] | None:
        meta = arg.meta.get(TENSOR_META) if isinstance(arg, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    def map(self, arg: Any) -> np.ndarray | None:
        """The channel map of an argument, or None if it is not a tensor node."""
        if not isinstance(arg, fx.Node):
            return None
        value = arg.meta.get(CHANNELS)
        return value if isinstance(value, np.ndarray) else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        """Every tensor-valued node among the (possibly nested) args and kwargs."""
        found: list[fx.Node] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node) and a.meta.get(CHANNELS) is not None:
                found.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return found

    # ---- creating units ------------------------------------------------------------------
    def root(
        self, node: fx.Node, name: str, kind: str, size: int, cdim: int, ndim: int
    ) -> np.ndarray:
        """Fresh units for an output channel dim; shared when the same module is called again."""
        key = ("out", name)
        if key in self._module_units:
            units = self._module_units[key]
        else:
            units = self.table.alloc(size)
            self._module_units[key] = units
            self.roots.append(RootRecord(name, kind, units, cdim))
        shape = [1] * ndim
        shape[cdim] = size
        return units.reshape(shape)

    def share_input(self, name: str, units: np.ndarray) -> np.ndarray:
        """Join the input units of repeated calls of one module (its weights see both)."""
        key = ("in", name)
        if key in self._module_units:
            self.table.union_arrays(self._module_units[key], units)
        else:
            self._module_units[key] = units
        return units

    def single(self, shape: tuple[int, ...], reason: str) -> np.ndarray:
        """One frozen unit covering a whole tensor that has no prunable channel dim."""
        u = self.table.alloc(1)
        self.table.freeze(u, reason)
        return u.reshape([1] * len(shape))

    def frozen_output(self, node: fx.Node, reason: str) -> Any:
        """Frozen single-unit maps matching the structure of the node's (tuple) output."""
        meta = node.meta.get(TENSOR_META)

        def build(m: Any) -> Any:
            if hasattr(m, "shape") and hasattr(m, "dtype"):
                return self.single(tuple(m.shape), reason)
            if isinstance(m, (list, tuple)):
                return tuple(build(x) for x in m)
            return None

        return build(meta)

    # ---- constraints ---------------------------------------------------------------------
    def freeze(self, u: np.ndarray, reason: str) -> None:
        self.table.freeze(u, reason)

    def inexact(self, u: np.ndarray, reason: str) -> None:
        self.table.mark_inexact(u, reason)

    def freeze_args(self, node: fx.Node, reason: str) -> None:
        for a in self.tensor_args(node):
            self.freeze(self.map(a), reason)

    def along(self, arg: fx.Node, dim: int) -> np.ndarray:
        """The units of ``arg``'s dim ``dim`` as a 1-D array (a consumer prunes only there).

        If the map varies along other dims too, the units of each slice are joined, since this
        consumer can only drop whole slices along ``dim``.
        """
        u, shape = self.map(arg), self.shape(arg)
        assert u is not None and shape is not None
        return self.force_dim(u, dim % len(shape), shape[dim])

    def force_dim(self, u: np.ndarray, dim: int, size: int) -> np.ndarray:
        """Make ``u`` vary along ``dim`` only (joining units as needed); return it 1-D."""
        others = [d for d in varying_dims(u) if d != dim]
        if others:
            moved = np.moveaxis(u, dim, 0)
            moved = moved.reshape(moved.shape[0], -1)
            self.table.union_arrays(moved[:, :1], moved)
            return np.broadcast_to(moved[:, 0], (size,)).copy()
        return np.broadcast_to(u.reshape(-1), (size,)).copy()

    def normalize(self, u: np.ndarray, cdim: int | None = None) -> np.ndarray:
        return normalize(self.table, u, cdim)

    def combine(self, node: fx.Node, inputs: list[fx.Node]) -> np.ndarray:
        """The map of an elementwise op with broadcasting: inputs that are full-size along the
        output's channel dim are joined position-wise; broadcast ones are left alone (their
        value is shared by every channel, so nothing of theirs is pruned here).

        The output's channel dim is one where a full-size input has channels, if any does, else
        one where any input has (the longest). An input broadcast along it that has channels
        of its own along another dim is frozen: the output's map follows one dim only, so it could not say that
        pruning those channels shrinks the output along theirs. (An input with no channel dim,
        such as a one-channel slice, is recorded in ``lone``: ``channel_groups`` freezes it
        where its group could prune it.)"""
        out_shape = self.shape(node)
        assert out_shape is not None
        nd = len(out_shape)
        items = []
        for a in inputs:
            u, s = self.map(a), self.shape(a)
            if u is None or s is None:
                continue
            pad = nd - u.ndim
            items.append((u.reshape((1,) * pad + u.shape), (1,) * pad + tuple(s)))
        lone = (
            f"{describe(node, self.gm)} broadcasts a tensor of one channel of this group: "
            "pruning that channel would leave nothing to broadcast"
        )
        # the channel dim: one where an operand of the output's full shape has channels, when
        # one has (a broadcast table cannot move them: q's heads times a rotary table over D)
        full = {d for u, s in items if s == tuple(out_shape) for d in varying_dims(u)}
        dims = sorted(full or {d for u, _ in items for d in varying_dims(u)})
        if not dims:
            covering = [u for u, s in items if s == tuple(out_shape)]
            self.lone.extend((int(u.flat[0]), lone) for u, s in items if s != tuple(out_shape))
            if not covering:
                return self.single(out_shape, f"broadcast result of {describe(node)}")
            for u in covering[1:]:
                self.table.union(int(covering[0].flat[0]), int(u.flat[0]))
            return covering[0]
        cdim = max(dims, key=lambda d: (out_shape[d], d))
        result: np.ndarray | None = None
        for u, s in items:
            if s[cdim] != out_shape[cdim]:
                if not varying_dims(u):
                    self.lone.append((int(u.flat[0]), lone))
                else:  # varies elsewhere but is broadcast along cdim
                    self.table.union_all(u)
                    self.freeze(
                        u,
                        f"{describe(node, self.gm)} broadcasts it along dim {cdim} while it "
                        "has channels along another dim: pruning them would shrink the result "
                        "along a dim the rewrite does not follow",
                    )
                continue
            u1 = self.force_dim(u, cdim, out_shape[cdim])
            if result is None:
                result = u1
            else:
                self.table.union_arrays(result, u1)
        assert result is not None
        shape = [1] * nd
        shape[cdim] = out_shape[cdim]
        return result.reshape(shape)

    def add_layer(self, record: LayerRecord) -> None:
        self.layers.append(record)


def is_tensor_node(node: fx.Node) -> bool:
    meta = node.meta.get(TENSOR_META)
    return any(True for _ in _tensor_metas(meta))
