"""The op table: everything fxprune knows about an op, in one place.

An op is keyed by what fx calls: a module class (``call_module``; subclasses inherit the entry
through their MRO), a function object (``call_function``) or a method name (``call_method``).
Its :class:`OpEntry` holds

- ``rule``: how channel units flow through it (:mod:`fxprune.analysis.channel_rules`; an op
  without a rule freezes every channel it touches, and the report names it);
- ``pruner``: for a module that holds channel-sized state, how to shrink it
  (:mod:`fxprune.rewrite.pruners`);
- traits other passes ask about (:class:`OpTraits`): whether the op commutes with a channel
  permutation (the unconstrained reorder may permute channels through it), whether it computes
  every channel from the same channel alone (segmented tensors may run it once per segment),
  whether it is an elementwise op of two tensors, and the out-of-place twin of an in-place op
  (removing a block must not let an in-place op write into the shortcut).

Teaching fxprune an op means one :func:`register_op` call (or the ``register_*_rule``
decorators and ``register_pruner``, which write into this same table).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "OpEntry",
    "OpTraits",
    "SizeArgs",
    "entry_for",
    "lookup",
    "out_of_place",
    "register_op",
    "traits_of",
]

OpKey = type | str | Callable[..., Any]


@dataclass(frozen=True)
class SizeArgs:
    """Where an op takes the sizes of its output's dims (``x.view(B, C, H, W)``).

    The sizes are one sequence (or one shape-valued node) at ``node.args[index]`` or keyword
    ``name``; with ``varargs`` they may also be spread over ``node.args[index:]``. The first
    size is that of output dim ``first_dim``, or, when ``dim_arg`` is set, of the dim given by
    ``node.args[dim_arg]`` (``unflatten``). With ``like``, the sizes are the shape of the tensor
    at ``node.args[index]`` (``x.reshape_as(y)``), and the rewrite may turn the op into the
    method ``like`` with explicit sizes (``x.reshape(...)``).
    """

    index: int
    name: str = "size"
    varargs: bool = True
    first_dim: int = 0
    dim_arg: int | None = None
    like: str | None = None


@dataclass(frozen=True)
class OpTraits:
    """What the passes after the channel analysis need to know about an op.

    Attributes:
        commutes: the output of a channel-permuted input is the output, permuted the same way.
        channelwise: every output channel is computed from the same input channel alone
            (with ``binary``: from the same channel of each input, size-1 inputs broadcast).
        binary: an elementwise op of two tensors.
        out_of_place: the out-of-place twin of an in-place op.
        size_args: where the op takes sizes of its output's dims (the sizes pass lets shape
            reads of pruned channel dims flow there, and only there).
        matmul: a matrix product ``a (..., n, k) @ b (..., k, m)`` (a parameter operand's
            channels lie on the dim it contracts with the other operand's channels).
    """

    commutes: bool = False
    channelwise: bool = False
    binary: bool = False
    out_of_place: Any = None
    size_args: SizeArgs | None = None
    matmul: bool = False


@dataclass(frozen=True)
class OpEntry:
    """One op's row in the table (see the module docstring)."""

    rule: Callable[..., Any] | None = None
    pruner: Callable[..., Any] | None = None
    traits: OpTraits = OpTraits()


_TABLE: dict[Any, OpEntry] = {}


def register_op(
    *keys: OpKey,
    rule: Callable[..., Any] | None = None,
    pruner: Callable[..., Any] | None = None,
    **traits: Any,
) -> None:
    """Add to the entries of ``keys`` (module classes, functions or method names).

    Only what is given changes: ``register_op(torch.erf, rule=passthrough, commutes=True,
    channelwise=True)`` teaches the channel analysis, the reorder and the segment pass at once.
    """
    for key in keys:
        old = _TABLE.get(key, OpEntry())
        _TABLE[key] = OpEntry(
            rule=rule if rule is not None else old.rule,
            pruner=pruner if pruner is not None else old.pruner,
            traits=dataclasses.replace(old.traits, **traits) if traits else old.traits,
        )


def lookup(key: Any, has: Callable[[OpEntry], bool] | None = None) -> OpEntry | None:
    """The entry of a function or method name (exact key), or of a module class: the nearest
    class in its MRO with an entry (for which ``has(entry)`` holds, when given)."""
    if isinstance(key, type):
        for cls in key.__mro__:
            entry = _TABLE.get(cls)
            if entry is not None and (has is None or has(entry)):
                return entry
        return None
    try:
        entry = _TABLE.get(key)
    except TypeError:  # unhashable target
        return None
    return entry if entry is not None and (has is None or has(entry)) else None


def entry_for(
    node: fx.Node, gm: fx.GraphModule, has: Callable[[OpEntry], bool] | None = None
) -> OpEntry | None:
    """The entry of the op a node calls, or None when the table does not know it."""
    _register_optional()
    if _LAZY:
        _register_lazy()
    if node.op == "call_module":
        return lookup(type(gm.get_submodule(str(node.target))), has)
    if node.op in ("call_function", "call_method"):
        return lookup(node.target, has)
    return None


def traits_of(node: fx.Node, gm: fx.GraphModule) -> OpTraits:
    """The node's op traits (all false for an unknown op)."""
    entry = entry_for(node, gm, lambda e: e.traits != OpTraits())
    return entry.traits if entry is not None else OpTraits()


def out_of_place(node: fx.Node) -> Any:
    """The out-of-place target for an in-place ``call_function`` / ``call_method``, else None.

    Tensor methods follow torch's naming convention (``add_`` → ``add``); functions need an
    entry (``operator.iadd`` → ``operator.add``).
    """
    if node.op == "call_method":
        name = str(node.target)
        return name[:-1] if name.endswith("_") and not name.endswith("__") else None
    if node.op == "call_function":
        entry = lookup(node.target)
        return entry.traits.out_of_place if entry is not None else None
    return None


# ---- built-in traits ---------------------------------------------------------------------------
# Channel rules and pruners register themselves from their own modules; the traits below are
# what the reorder (commutes) and the segment pass (channelwise, binary) rely on.

_ELEMENTWISE_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
# PReLU may hold per-channel slopes: it has a rule but none of these traits
register_op(*_ELEMENTWISE_ACTIVATIONS, commutes=True, channelwise=True)
register_op(
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, commutes=True,
    channelwise=True,
)  # fmt: skip
register_op(nn.BatchNorm1d, nn.BatchNorm2d, commutes=True, channelwise=True)
register_op(nn.modules.batchnorm._BatchNorm, commutes=True)
register_op(nn.Linear, nn.LayerNorm, nn.Flatten, commutes=True)

_BINARY_FUNCTIONS = (
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    # x ** 2 (timm's StarReLU), 2 ** x, x ** y: elementwise whichever operands are tensors. On
    # ints read off shapes (C ** -0.5) it computes a size, which the sizes pass freezes
    operator.pow,
    operator.ipow,
    torch.pow,
)
register_op(*_BINARY_FUNCTIONS, commutes=True, channelwise=True, binary=True)
register_op("add", "add_", "mul", "mul_", "sub", "div", "pow", "pow_", commutes=True,
            channelwise=True, binary=True)  # fmt: skip
# move channel positions as a whole: a permutation passes through, channels do not stay put
register_op(torch.cat, torch.concat, torch.permute, torch.transpose, "permute", "transpose",
            commutes=True)  # fmt: skip
register_op(
    torch.flatten,  # channel-wise only as [N, C, 1, 1] -> [N, C] (the segment pass checks)
    torch.mean,  # channel-wise only over spatial dims (the segment pass checks)
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.square,  # timm's SquaredReLU
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.dropout,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "square",
    "flatten",
    "mean",
    "contiguous",
    "clone",
    commutes=True,
    channelwise=True,
)
for _inplace, _twin in (
    (operator.iadd, operator.add),
    (operator.isub, operator.sub),
    (operator.imul, operator.mul),
    (operator.itruediv, operator.truediv),
    (operator.ipow, operator.pow),
    (torch.relu_, torch.relu),
    (F.relu_, F.relu),
):
    register_op(_inplace, out_of_place=_twin)

register_op(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__", matmul=True)

# ops that take the sizes of their output's dims: a shape read of a pruned channel dim may flow
# there (the rewrite writes the pruned size), nowhere else (fxprune.analysis.sizes)
register_op("view", "expand", "new_zeros", "new_ones", "new_empty", size_args=SizeArgs(1))
register_op("reshape", size_args=SizeArgs(1, name="shape"))
register_op("new_full", size_args=SizeArgs(1, varargs=False))
register_op(torch.reshape, size_args=SizeArgs(1, name="shape", varargs=False))
register_op(torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn,
            size_args=SizeArgs(0))  # fmt: skip
register_op(torch.full, size_args=SizeArgs(0, varargs=False))
register_op("reshape_as", size_args=SizeArgs(1, name="other", like="reshape"))
register_op("view_as", size_args=SizeArgs(1, name="other", like="view"))
register_op("unflatten", torch.unflatten, size_args=SizeArgs(2, name="sizes", varargs=False,
            dim_arg=1))  # fmt: skip


# entries of functions in optional packages that are slow to import (timm): registered when the
# package is first seen imported (a model that calls the function has imported it), so fxprune
# never imports the package itself. (module name, attribute) -> the pending register_op keywords
_LAZY: dict[tuple[str, str], list[dict[str, Any]]] = {}


def register_lazy(module: str, name: str, **entry: Any) -> None:
    """``register_op(module.name, **entry)`` once ``module`` is imported (by anyone).

    For a function of an optional package: its key is the function object, which fxprune cannot
    hold without importing the package. Until then no graph can call it.
    """
    _LAZY.setdefault((module, name), []).append(entry)
    _register_lazy()


def _register_lazy() -> None:
    for key in [k for k in _LAZY if k[0] in sys.modules]:
        module = importlib.import_module(key[0])  # already imported: a dict lookup
        fn = getattr(module, key[1], None)
        for entry in _LAZY.pop(key):
            if fn is not None:
                register_op(fn, **entry)


# timm's maybe_add_mask (timm.layers.attention, fx-wrapped: a leaf of fx traces): ``scores if
# mask is None else scores + mask``, an elementwise add whose second operand is optional
register_lazy("timm.layers.attention", "maybe_add_mask", commutes=True, channelwise=True,
              binary=True)  # fmt: skip


@functools.cache
def _register_optional() -> None:
    """Entries for ops of optional packages, added on first use (torchvision is optional)."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional for the library
        return
    # per sample, the same factor for every channel (identity in eval)
    register_op(StochasticDepth, stochastic_depth, commutes=True, channelwise=True)
