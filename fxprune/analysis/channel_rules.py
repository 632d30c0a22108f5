"""Per-op channel rules: how each op maps the channel units of its inputs to its output.

A rule is a function ``rule(ctx, node, *maybe_module) -> map`` registered for a module class,
a function object or a method name. Ops without a rule are *unknown*: the channel-space pass
freezes every unit they touch and records why. To teach fxprune a new op, register a rule here
(or from user code, see CONTRIBUTING.md); rules live in the one op table
(:mod:`fxprune.analysis.ops`), with the op's pruner and traits.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.analysis.canonicalize import LIFTABLE
from fxprune.analysis.channel_context import ChannelContext, LayerRecord, describe
from fxprune.analysis.ops import (
    _ELEMENTWISE_ACTIVATIONS,
    entry_for,
    register_lazy,
    register_op,
    traits_of,
)
from fxprune.analysis.std_conv import StdConv2d
from fxprune.core.channel_units import compact, expand_index, varying_dims
from fxprune.core.meta import NOT_LIFTED

__all__ = [
    "ATTENTION",
    "FunctionRule",
    "ModuleRule",
    "lookup_rule",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
]

ModuleRule = Callable[[ChannelContext, fx.Node, nn.Module], Any]
FunctionRule = Callable[[ChannelContext, fx.Node], Any]


def register_module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register ``rule(ctx, node, module)`` for modules of these classes (and subclasses)."""

    def deco(rule: ModuleRule) -> ModuleRule:
        register_op(*types, rule=rule)
        return rule

    return deco


def register_function_rule(*fns: Any) -> Callable[[FunctionRule], FunctionRule]:
    """Register ``rule(ctx, node)`` for ``call_function`` nodes with these targets."""

    def deco(rule: FunctionRule) -> FunctionRule:
        register_op(*fns, rule=rule)
        return rule

    return deco


def register_method_rule(*names: str) -> Callable[[FunctionRule], FunctionRule]:
    """Register ``rule(ctx, node)`` for ``call_method`` nodes (``x.view(...)``) by name."""

    def deco(rule: FunctionRule) -> FunctionRule:
        register_op(*names, rule=rule)
        return rule

    return deco


def lookup_rule(
    node: fx.Node, gm: fx.GraphModule
) -> Callable[[ChannelContext, fx.Node], Any] | None:
    """The rule for a node, or None when the op is unknown."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    entry = entry_for(node, gm, lambda e: e.rule is not None)
    if entry is None:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return lambda ctx, n, _r=entry.rule, _m=module: _r(ctx, n, _m)
    return entry.rule


# ---- argument helpers --------------------------------------------------------------------------
def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return [v % ndim for v in value]
    raise ValueError(f"unsupported dim argument {value!r}")


def cdim_of(u: np.ndarray) -> int | None:
    dims = varying_dims(u)
    return dims[0] if dims else None


# ---- same-space ops ----------------------------------------------------------------------------
def passthrough(ctx: ChannelContext, node: fx.Node, *_: Any) -> np.ndarray:
    """Elementwise in the channel dim: output channel i depends on input channel i only."""
    first = ctx.tensor_args(node)[0]
    return ctx.map(first)


def spatial(ctx: ChannelContext, node: fx.Node, *_: Any) -> np.ndarray:
    """Pooling / resampling over the trailing spatial dims; the channel dim must be dim 1."""
    first = ctx.tensor_args(node)[0]
    u = ctx.map(first)
    c = cdim_of(u)
    if c is not None and c >= 2:
        ctx.freeze(u, f"{describe(node, ctx.gm)} pools over the dim that carries channels")
        return ctx.frozen_output(node, "output of a pooling over channels")
    return u


# elementwise activations and dropouts (the op table's), plus PReLU (per-channel slopes)
_ACTIVATIONS = (*_ELEMENTWISE_ACTIVATIONS, nn.PReLU)
register_module_rule(*(a for a in _ACTIVATIONS if a is not nn.PReLU))(passthrough)
register_module_rule(
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)(spatial)

_UNARY_FUNCTIONS: list[Any] = [
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.elu,
    F.leaky_relu,
    F.hardtanh,
    F.mish,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.sin,
    torch.cos,
    torch.abs,
    torch.sqrt,
    torch.rsqrt,
    torch.square,
    torch.clamp,
    torch.nn.functional.relu_,
    operator.neg,
    torch.neg,
    torch.clone,
]
register_function_rule(*_UNARY_FUNCTIONS)(passthrough)
register_method_rule(
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "exp",
    "sin",
    "cos",
    "abs",
    "sqrt",
    "rsqrt",
    "square",
    "clamp",
    "clamp_",
    "contiguous",
    "clone",
    "float",
    "half",
    "double",
    "to",
    "type_as",
    "detach",
    "neg",
    "hardtanh_",
    "gelu",
    "silu",
)(passthrough)
register_function_rule(
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    torch._C._nn.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    F.interpolate,
)(spatial)


@register_function_rule(torch.roll)
@register_method_rule("roll")
def roll(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``torch.roll(x, shifts, dims)`` (Swin's shifted windows): a cyclic shift along dims that
    do not carry channels leaves every channel where it was; one along the channel dim (or over
    the flattened tensor, ``dims=None``) moves channels into each other's places."""
    u, shape = _padded(ctx, node.args[0])
    dims = _dims(arg(node, 2, "dims"), len(shape))
    c = cdim_of(u)
    if c is not None and (dims is None or c in dims):
        why = f"{describe(node, ctx.gm)} shifts along the channel dim"
        ctx.freeze(u, why)
        return ctx.frozen_output(node, why)
    return u


@register_function_rule(F.pad)
def pad(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``F.pad(x, (left, right, top, bottom, ...))`` pads the last dims, two sizes per dim from
    the last one backwards. Padding dims without channels (spatial padding, Swin's windows,
    timm's "same" padding) keeps every channel; padding the channel dim adds channels that no
    unit stands for, so that freezes."""
    u, shape = _padded(ctx, node.args[0])
    sizes = list(arg(node, 1, "pad"))
    c = cdim_of(u)
    padded = {
        len(shape) - 1 - i // 2 for i, s in enumerate(sizes) if isinstance(s, fx.Node) or s != 0
    }
    if c is not None and c in padded:
        why = f"{describe(node, ctx.gm)} pads the channel dim"
        ctx.freeze(u, why)
        return ctx.frozen_output(node, why)
    return u


try:  # torchvision wraps stochastic depth so fx keeps it as one call: per-sample, per-channel ok
    from torchvision.ops import stochastic_depth as _sd

    register_function_rule(_sd)(passthrough)
except ImportError:  # pragma: no cover - torchvision is optional
    pass


# ---- elementwise between tensors -------------------------------------------------------------
@register_function_rule(
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.pow,
    operator.ipow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
    torch.maximum,
    torch.minimum,
    torch.where,
)
@register_method_rule(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "expand_as"
)
def elementwise(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """Residual adds, SE scaling, layer scale: full-size operands are coupled position-wise."""
    if node.op == "call_method" and node.target == "expand_as":
        return ctx.combine(node, [node.args[0]])
    return ctx.combine(node, ctx.tensor_args(node))


# timm's ``maybe_add_mask(scores, mask)``: ``scores`` alone when the mask is None (a constant
# None arg, no tensor), else ``scores + mask``: tensor_args holds exactly the operands added
register_lazy("timm.layers.attention", "maybe_add_mask", rule=elementwise)


# ---- conv / linear: roots ----------------------------------------------------------------------
@register_module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: ChannelContext, node: fx.Node, m: nn.Module) -> np.ndarray:
    x = node.args[0]
    out_shape = ctx.shape(node)
    key = ctx.key(node, m)
    in_units = ctx.share_input(key, ctx.along(x, 1))
    g = m.groups
    if g == 1:
        out = ctx.root(node, key, "conv", m.out_channels, 1, len(out_shape))
    elif g == m.in_channels == m.out_channels:  # depthwise: output channel i reads input i
        out = in_units.reshape([1, -1] + [1] * (len(out_shape) - 2))
    elif g == m.in_channels:  # depthwise, k outputs per input: output c*k + j reads input c
        out = np.repeat(in_units, m.out_channels // g).reshape([1, -1] + [1] * (len(out_shape) - 2))
    else:  # grouped: every group must keep the same number of inputs and of outputs
        out = ctx.root(node, key, "conv", m.out_channels, 1, len(out_shape))
        why = f"grouped conv {describe(node, ctx.gm)} (groups={g})"
        ctx.equal_count.append((in_units, g, why))
        ctx.equal_count.append((out.reshape(-1), g, why))
    ctx.add_layer(LayerRecord(node.name, node.target, "conv", in_units, out.reshape(-1), g))
    return out


@register_module_rule(StdConv2d)
def std_conv(ctx: ChannelContext, node: fx.Node, m: StdConv2d) -> np.ndarray:
    """A conv on its weight standardised per output channel (:mod:`fxprune.analysis.std_conv`):
    pruning inputs changes every kept row's statistics, except in a depthwise conv (with or
    without a channel multiplier: an input goes with the rows that read it)."""
    out = conv(ctx, node, m)
    if m.groups == 1 or m.groups != m.in_channels:
        ctx.inexact(
            ctx.layers[-1].in_units,
            f"{describe(node, ctx.gm)} standardises its weight over its input channels: "
            "pruning them changes the statistics",
        )
    return out


@register_module_rule(nn.Linear)
def linear(ctx: ChannelContext, node: fx.Node, m: nn.Linear) -> np.ndarray:
    x = node.args[0]
    out_shape = ctx.shape(node)
    key = ctx.key(node, m)
    in_units = ctx.share_input(key, ctx.along(x, -1))
    out = ctx.root(node, key, "linear", m.out_features, len(out_shape) - 1, len(out_shape))
    ctx.add_layer(LayerRecord(node.name, node.target, "linear", in_units, out.reshape(-1)))
    return out


# ---- normalisation ---------------------------------------------------------------------------
@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)
def batch_norm(ctx: ChannelContext, node: fx.Node, m: nn.Module) -> np.ndarray:
    x = node.args[0]
    units = ctx.share_input(ctx.key(node, m), ctx.along(x, 1))
    ctx.add_layer(LayerRecord(node.name, node.target, "norm", units, units))
    return units.reshape([1, -1] + [1] * (len(ctx.shape(node)) - 2))


def _rows_only(ctx: ChannelContext, node: fx.Node) -> np.ndarray | None:
    """The input map of a norm over the last dim when its channels lie on another dim only
    (heads of ``(B, H, N, D)`` under timm's ``qk_norm``), else None.

    Each row is normalised on its own, so dropping rows is exact and leaves the norm's
    weights (over the last dim) whole: the map passes through."""
    u, shape = _padded(ctx, node.args[0])
    dims = varying_dims(u)
    return u if dims and len(shape) - 1 not in dims else None


def _layer_norm(
    ctx: ChannelContext, node: fx.Node, name: str, normalized: tuple[int, ...]
) -> np.ndarray:
    x = node.args[0]
    shape = ctx.shape(node)
    if len(normalized) != 1:
        ctx.freeze(ctx.map(x), f"{describe(node, ctx.gm)} normalises over several dims")
        return ctx.frozen_output(node, "output of a multi-dim LayerNorm")
    units = ctx.share_input(name, ctx.along(x, -1))
    ctx.inexact(units, f"LayerNorm {describe(node, ctx.gm)}: pruning changes its mean/variance")
    ctx.add_layer(LayerRecord(node.name, name, "norm", units, units))
    return units.reshape([1] * (len(shape) - 1) + [-1])


@register_module_rule(nn.LayerNorm)
def layer_norm_module(ctx: ChannelContext, node: fx.Node, m: nn.LayerNorm) -> np.ndarray:
    if len(m.normalized_shape) == 1 and (rows := _rows_only(ctx, node)) is not None:
        return rows
    return _layer_norm(ctx, node, ctx.key(node, m), tuple(m.normalized_shape))


@register_function_rule(F.layer_norm)
def layer_norm_function(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    shape = arg(node, 1, "normalized_shape")
    normalized = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(normalized) == 1 and (rows := _rows_only(ctx, node)) is not None:
        return rows
    out = _layer_norm(ctx, node, node.name, normalized)
    for i, key in ((2, "weight"), (3, "bias")):
        p = arg(node, i, key)
        if isinstance(p, fx.Node) and ctx.map(p) is not None:
            ctx.table.union_arrays(ctx.along(p, -1), out.reshape(-1))
    return out


@register_module_rule(nn.GroupNorm)
def group_norm(ctx: ChannelContext, node: fx.Node, m: nn.GroupNorm) -> np.ndarray:
    x = node.args[0]
    units = ctx.share_input(ctx.key(node, m), ctx.along(x, 1))
    why = f"GroupNorm {describe(node, ctx.gm)}: pruning changes its group statistics"
    ctx.inexact(units, why)
    ctx.equal_count.append((units, m.num_groups, why))
    ctx.add_layer(LayerRecord(node.name, node.target, "norm", units, units))
    return units.reshape([1, -1] + [1] * (len(ctx.shape(node)) - 2))


# ---- shape ops ---------------------------------------------------------------------------------
@register_function_rule(torch.flatten, torch.reshape, torch.unflatten)
@register_method_rule("view", "reshape", "flatten", "unflatten", "reshape_as", "view_as")
@register_module_rule(nn.Flatten, nn.Unflatten)
def reshape(ctx: ChannelContext, node: fx.Node, *_: Any) -> np.ndarray:
    """Any reshape: lay the units out over the input shape and reshape them like the data.

    A reshape that splits the channel dim over several dims keeps one of them: the longest
    (a multi-head split ``(B, N, H, D)`` then ties the same position ``d`` of every head), or,
    under ``attention="heads"``, the head dim when :func:`head_dim` finds one (then the ``D``
    positions of each head, and of ``q``, ``k`` and ``v``, are tied into one index per head);
    under ``"auto"``, the head dim only at the splits :func:`analyze_channels` chose.
    """
    x = ctx.tensor_args(node)[0]
    u, in_shape, out_shape = ctx.map(x), ctx.shape(x), ctx.shape(node)
    full = np.broadcast_to(u.reshape((1,) * (len(in_shape) - u.ndim) + u.shape), in_shape)
    out = full.reshape(out_shape)
    if ctx.attention == "head_dim" or node.name in ctx.no_heads:  # settled: positions
        return ctx.normalize(out)
    cdim = head_dim(ctx, node, out)
    if cdim is None or not ctx.whole_heads(node.name):
        result = ctx.normalize(out)
        if cdim is not None and ctx.attention == "auto":
            ctx.position_splits[node.name] = result
        return result
    result = ctx.normalize(out, cdim)
    ctx.head_splits[node.name] = result
    return result


@register_function_rule(torch.permute)
@register_method_rule("permute")
def permute(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    rest = list(node.args[1:]) or [node.kwargs["dims"]]
    dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return np.transpose(ctx.map(node.args[0]), dims)


@register_function_rule(torch.transpose, torch.swapaxes)
@register_method_rule("transpose", "swapaxes")
def transpose(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    u = ctx.map(node.args[0])
    return np.swapaxes(u, node.args[1] % u.ndim, node.args[2] % u.ndim)


@register_function_rule(torch.unsqueeze)
@register_method_rule("unsqueeze")
def unsqueeze(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    u = ctx.map(node.args[0])
    d = arg(node, 1, "dim")
    return np.expand_dims(u, d % (u.ndim + 1))


@register_function_rule(torch.squeeze)
@register_method_rule("squeeze")
def squeeze(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    u, shape = ctx.map(node.args[0]), ctx.shape(node.args[0])
    d = arg(node, 1, "dim")
    dims = [i for i, s in enumerate(shape) if s == 1] if d is None else _dims(d, len(shape))
    dims = [i for i in dims if shape[i] == 1]
    return np.squeeze(u, axis=tuple(dims)) if dims else u


@register_method_rule("expand")
def expand(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    u, out_shape = ctx.map(node.args[0]), ctx.shape(node)
    return u.reshape((1,) * (len(out_shape) - u.ndim) + u.shape)


@register_method_rule("new_zeros", "new_ones", "new_empty", "new_full")
def new_tensor(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``x.new_zeros(B, C, H)``: a fresh tensor that reads none of ``x``'s channels (only its
    dtype and device), so ``x`` is left alone; the new tensor has no prunable channels, and its
    sizes keep their analysed values (:mod:`fxprune.analysis.sizes`)."""
    return ctx.single(ctx.shape(node), f"new tensor made by {describe(node, ctx.gm)}")


@register_function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """Concatenation: maps are concatenated (DenseNet, Inception), then normalised."""
    tensors = list(arg(node, 0, "tensors"))
    out_shape = ctx.shape(node)
    nd = len(out_shape)
    dim = arg(node, 1, "dim", 0) % nd
    maps = [ctx.map(t) for t in tensors]
    maps = [u.reshape((1,) * (nd - u.ndim) + u.shape) for u in maps]
    vary = {d for u in maps for d in varying_dims(u)}
    if len(vary) == 1 and dim not in vary:
        # joined along another dim than their channels' (a class token before the patch
        # tokens): channel i of every part is channel i of the result
        (cdim,) = vary
        lines = [ctx.force_dim(u, cdim, out_shape[cdim]) for u in maps]
        for line in lines[1:]:
            ctx.table.union_arrays(lines[0], line)
        shape = [1] * nd
        shape[cdim] = out_shape[cdim]
        return lines[0].reshape(shape)
    parts = []
    for t, u in zip(tensors, maps, strict=False):
        target = [out_shape[d] if d in vary else 1 for d in range(nd)]
        target[dim] = ctx.shape(t)[dim]
        parts.append(np.broadcast_to(u, target))
    return ctx.normalize(np.concatenate(parts, axis=dim))


@register_function_rule(torch.stack)
def stack(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    tensors = list(arg(node, 0, "tensors"))
    out_shape = ctx.shape(node)
    dim = arg(node, 1, "dim", 0) % len(out_shape)
    maps = [np.expand_dims(ctx.map(t), dim) for t in tensors]
    vary = {d for u in maps for d in varying_dims(u)}
    target = [out_shape[d] if d in vary else 1 for d in range(len(out_shape))]
    target[dim] = 1
    return ctx.normalize(np.concatenate([np.broadcast_to(u, target) for u in maps], axis=dim))


@register_function_rule(torch.split, torch.chunk, torch.tensor_split)
@register_method_rule("split", "chunk", "tensor_split")
def split(ctx: ChannelContext, node: fx.Node) -> tuple[np.ndarray, ...]:
    """split / chunk: each output is a slice of the input's map along ``dim``."""
    x = node.args[0]
    u, shape = ctx.map(x), ctx.shape(x)
    dim = arg(node, 2, "dim", 0) % len(shape)
    outs, start = [], 0
    for meta in node.meta["tensor_meta"]:
        size = meta.shape[dim]
        outs.append(u if u.shape[dim] == 1 else np.take(u, range(start, start + size), axis=dim))
        start += size
    return tuple(outs)


@register_function_rule(operator.getitem)
def getitem(ctx: ChannelContext, node: fx.Node) -> Any:
    """Tuple element selection, or basic tensor indexing with slices / ints / None / ``...``."""
    src, index = node.args
    value = src.meta.get("fxprune.channels")
    if isinstance(value, tuple):
        return value[index]
    u, shape = ctx.map(src), ctx.shape(src)
    idx = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
        return None  # advanced indexing: treated as unknown by the caller
    expanded = expand_index(idx, len(shape))
    c = cdim_of(u)
    out_index: list[Any] = []
    d = 0
    for i in expanded:
        if i is None:
            out_index.append(None)
            continue
        if u.shape[d] == 1:  # no channels here: any index, sizes computed in the graph too
            out_index.append(0 if isinstance(i, int) else slice(None))
        elif isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop)):
            return None  # a computed range of channels: not followed
        else:
            if d == c and not (isinstance(i, slice) and i.step in (None, 1)):
                ctx.freeze(u, f"{describe(node, ctx.gm)} picks single channels")
            out_index.append(i)
        d += 1
    return u[tuple(out_index)]


# ---- reductions and normalisations over a dim ------------------------------------------------
@register_function_rule(torch.mean, torch.sum, torch.amax, torch.amin)
@register_method_rule("mean", "sum", "amax", "amin")
def reduce(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    return _reduce(ctx, node, bool(arg(node, 2, "keepdim", False)))


@register_function_rule(torch.var, torch.std)
@register_method_rule("var", "std")
def spread(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``var`` / ``std`` (RMS and layer norms written out): a reduction like ``mean``; their
    third positional argument is ``unbiased``, so ``keepdim`` is the fourth."""
    return _reduce(ctx, node, bool(arg(node, 3, "keepdim", False)))


def _reduce(ctx: ChannelContext, node: fx.Node, keepdim: bool) -> np.ndarray:
    x = node.args[0]
    u, shape = ctx.map(x), ctx.shape(x)
    dims = _dims(arg(node, 1, "dim"), len(shape))
    c = cdim_of(u)
    if dims is None or (c is not None and c in dims):
        ctx.inexact(u, f"{describe(node, ctx.gm)} reduces over the channel dim")
        return ctx.frozen_output(node, "result of a reduction over channels")
    if keepdim:
        return u
    return np.squeeze(u, axis=tuple(dims))


@register_function_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@register_method_rule("softmax", "log_softmax")
def softmax(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    x = node.args[0]
    u = ctx.map(x)
    dim = arg(node, 1, "dim") % u.ndim
    if cdim_of(u) == dim:
        ctx.freeze(u, f"{describe(node, ctx.gm)} normalises over the channel dim")
        return ctx.frozen_output(node, "softmax over channels")
    return u


# ---- attention: unbind, matrix products, scaled dot-product attention -------------------------
def _padded(ctx: ChannelContext, x: fx.Node) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x``'s map with as many dims as ``x`` itself, and ``x``'s shape."""
    u, shape = ctx.map(x), ctx.shape(x)
    if u is None or shape is None:
        raise ValueError("not a tensor with a channel map")
    return u.reshape((1,) * (len(shape) - u.ndim) + u.shape), shape


@register_function_rule(torch.unbind)
@register_method_rule("unbind")
def unbind(ctx: ChannelContext, node: fx.Node) -> tuple[np.ndarray, ...]:
    """``q, k, v = qkv.unbind(0)``: every output is one slice along ``dim``, without that dim.

    A dim that carries channels cannot be unbound: each output would be one channel alone.
    """
    u, shape = _padded(ctx, node.args[0])
    dim = arg(node, 1, "dim", 0) % len(shape)
    if u.shape[dim] != 1:
        why = f"{describe(node, ctx.gm)} takes the channel dim apart"
        ctx.freeze(u, why)
        return ctx.frozen_output(node, why)
    out = np.squeeze(u, axis=dim)
    return tuple(out for _ in range(shape[dim]))


def _line(u: np.ndarray, dim: int) -> np.ndarray | None:
    """The 1-D units of a map that varies along ``dim`` only; None if it varies nowhere."""
    dims = varying_dims(u)
    if not dims:
        return None
    if dims != [dim]:
        raise ValueError("the map varies along another dim")
    return np.moveaxis(u, dim, -1).reshape(-1)


def _contract(
    ctx: ChannelContext, node: fx.Node, a: np.ndarray | None, b: np.ndarray | None, why: str
) -> None:
    """Join the units of a contracted dim of two operands position-wise, or freeze them.

    A dim summed over may be pruned when both operands drop the same positions (the masked
    terms are zero); if only one operand has channels there, the other could not follow.
    """
    if a is not None and b is not None:
        ctx.table.union_arrays(a, b)
    elif a is not None or b is not None:
        ctx.freeze(a if a is not None else b, f"{describe(node, ctx.gm)}: {why}")


def _batch_channels(
    ctx: ChannelContext,
    node: fx.Node,
    operands: list[tuple[np.ndarray, tuple[int, ...]]],
    core: list[int],
) -> np.ndarray | None:
    """The output map of a batched product whose operands carry channels on a *batch* dim
    (attention heads: ``(B, H, N, D)``), or None when none does.

    Each batch index is computed from that index of every operand alone, so dropping one drops
    it from the result and from nothing else: the operands that carry the dim must carry the
    same units there (joined), the others must be broadcast along it (size 1). Anything else
    — channels on several batch dims, or on a batch dim and elsewhere, or an operand full-size
    along the dim without channels there (it could not follow) — freezes them all.

    ``operands`` are ``(map, shape)`` pairs; ``core[i]`` is how many trailing dims of operand
    ``i`` are not batch dims (2 for a matrix, 1 for a vector).
    """
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    nd = len(out_shape)
    padded = [
        (u.reshape((1,) * (nd - u.ndim) + u.shape), (1,) * (nd - len(s)) + tuple(s))
        for u, s in operands
    ]
    found = {
        d for (u, s), c in zip(padded, core, strict=True) for d in varying_dims(u) if d < nd - c
    }
    if not found:
        return None
    where = describe(node, ctx.gm)
    lines: list[np.ndarray] = []
    j = min(found)
    ok = len(found) == 1
    for u, s in padded if ok else ():
        dims = varying_dims(u)
        if dims == [j] and s[j] == out_shape[j]:
            lines.append(np.moveaxis(u, j, -1).reshape(-1))
        elif dims or s[j] != 1:
            ok = False
    if not ok:
        why = f"{where} has channels on a batch dim that not every operand can follow"
        for u, _ in padded:
            ctx.freeze(u, why)
        return ctx.frozen_output(node, why)
    for line in lines[1:]:
        ctx.table.union_arrays(lines[0], line)
    shape = [1] * nd
    shape[j] = out_shape[j]
    return lines[0].reshape(shape)


@register_function_rule(torch.matmul, operator.matmul, torch.bmm)
@register_method_rule("matmul", "bmm", "__matmul__")
def matmul(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``a @ b`` with ``a: (..., n, k)`` and ``b: (..., k, m)`` (attention's ``q @ k.T`` and
    ``attn @ v``): channels on the contracted ``k`` are pruned in both operands alike, channels
    on ``n`` (of ``a``) or ``m`` (of ``b``) carry over to the output. Channels on a batch dim,
    or on both ``n`` and ``m`` at once (the output would vary along two dims), freeze."""
    a, b = node.args[0], node.args[1]
    ua, sa = _padded(ctx, a)
    ub, sb = _padded(ctx, b)
    out_shape = ctx.shape(node)
    if len(sa) < 2 or len(sb) < 2 or out_shape is None:
        raise ValueError("matrix-vector products are not followed")
    where = describe(node, ctx.gm)
    heads = _batch_channels(ctx, node, [(ua, sa), (ub, sb)], [2, 2])
    if heads is not None:
        return heads
    batch_a = [d for d in varying_dims(ua) if d < len(sa) - 2]
    batch_b = [d for d in varying_dims(ub) if d < len(sb) - 2]
    rows = len(sa) - 2 in varying_dims(ua)
    cols = len(sb) - 1 in varying_dims(ub)
    if batch_a or batch_b or (rows and cols):
        why = f"{where} multiplies tensors whose channels it cannot follow"
        ctx.freeze(ua, why)
        ctx.freeze(ub, why)
        return ctx.frozen_output(node, why)
    _contract(
        ctx,
        node,
        None if rows else _line(ua, len(sa) - 1),
        None if cols else _line(ub, len(sb) - 2),
        "one operand has channels on the contracted dim, the other not",
    )
    nd = len(out_shape)
    if rows:
        return _line(ua, len(sa) - 2).reshape([1] * (nd - 2) + [-1, 1])
    if cols:
        return _line(ub, len(sb) - 1).reshape([1] * (nd - 1) + [-1])
    return ctx.single(out_shape, f"product {where}: its channels were summed over")


@register_function_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx: ChannelContext, node: fx.Node) -> np.ndarray:
    """``softmax(q kᵀ · scale + mask) v`` over ``(..., L, E)`` queries and ``(..., S, E)`` keys.

    The embedding dim ``E`` of ``q`` and ``k`` is contracted: it is pruned in both alike (the
    masked terms add nothing to the scores). The default scale ``1/sqrt(E)`` would change with
    ``E``, so the rewrite passes the original scale explicitly. The value dim ``Ev`` carries
    over to the output. Channels on a batch dim (heads) carry over when ``q``, ``k``, ``v``
    (and a mask) carry the same ones or broadcast there (:func:`_batch_channels`); on any other
    dim (tokens, the mask's) they freeze.
    """
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    maps = [_padded(ctx, t) for t in (q, k, v)]
    out_shape = ctx.shape(node)
    where = describe(node, ctx.gm)
    mask = arg(node, 3, "attn_mask")
    masks = [_padded(ctx, mask)] if isinstance(mask, fx.Node) and ctx.map(mask) is not None else []
    heads = _batch_channels(ctx, node, maps + masks, [2] * (len(maps) + len(masks)))
    if heads is not None:  # whole heads: every one is attention of its own q, k and v
        return heads
    others = [d for u, s in maps for d in varying_dims(u) if d != len(s) - 1]
    if isinstance(mask, fx.Node) and ctx.map(mask) is not None and varying_dims(ctx.map(mask)):
        ctx.freeze(ctx.map(mask), f"{where}: the attention mask has channels")
    if others or out_shape is None:
        why = f"{where} has channels on a dim other than the embedding dim"
        for u, _ in maps:
            ctx.freeze(u, why)
        return ctx.frozen_output(node, why)
    (uq, sq), (uk, sk), (uv, sv) = maps
    _contract(
        ctx,
        node,
        _line(uq, len(sq) - 1),
        _line(uk, len(sk) - 1),
        "the query and the key must keep the same embedding channels",
    )
    values = _line(uv, len(sv) - 1)
    if values is None:
        return ctx.single(out_shape, f"output of {where}")
    return values.reshape([1] * (len(out_shape) - 1) + [-1])


# ---- whole heads (attention="heads") ------------------------------------------------------------
#: what a multi-head split offers as indices: positions within every head, whole heads, or
#: positions except where they freeze and whole heads do not
ATTENTION = ("head_dim", "heads", "auto")
#: the default: on every model where positions prune, ``"auto"`` is ``"head_dim"``; where a
#: split's positions freeze (interleaved rotary embeddings) it still prunes whole heads
DEFAULT_ATTENTION = "auto"

_MOVES = ("permute", "transpose", "swapaxes", "unbind", "unsqueeze")
_FOLLOW_DEPTH = 32


def head_dim(ctx: ChannelContext, node: fx.Node, u: np.ndarray) -> int | None:
    """The head dim of a reshape that splits channels over several dims, or None.

    That is a dim of the split that every use of the reshape's output carries — through moves
    of dims (permute, transpose, unbind along another dim, unsqueeze) and ops on single
    elements (activations, dropout, a scale, an added bias) — to a *batch* dim of scaled
    dot-product attention or of a matrix product: timm's ``qkv.reshape(B, N, 3, H, D)
    .permute(2, 0, 3, 1, 4).unbind(0)`` into SDPA, or ``q.view(B, N, H, D).transpose(1, 2)``
    into ``q @ k.transpose(-2, -1)``. Only a preference: the rules of the ops on the way decide
    what is sound (:func:`_batch_channels`), so a wrong guess can only freeze.
    """
    dims = varying_dims(compact(u))
    if len(dims) < 2:
        return None
    return next((d for d in dims if _carries_to_a_batch_dim(ctx, node, d, 0)), None)


def _carries_to_a_batch_dim(ctx: ChannelContext, node: fx.Node, dim: int, depth: int) -> bool:
    """Whether every use of ``node`` carries its dim ``dim`` to an attention batch dim (a read
    of its size carries no data: the sizes pass checks where the size goes)."""
    users = [u for u in node.users if not _reads_size(u)]
    if not users or depth > _FOLLOW_DEPTH:
        return False
    return all(_user_carries(ctx, node, user, dim, depth) for user in users)


#: what reading a tensor attribute gives that is not its data (a size, a dtype, a device)
_METADATA = ("shape", "dtype", "device", "ndim")


def _reads_size(node: fx.Node) -> bool:
    """Whether ``node`` reads a size or other metadata of its input (``x.shape``,
    ``x.size()``, ``x.dtype`` for a cast), which carries none of its data."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA


def _user_carries(ctx: ChannelContext, src: fx.Node, user: fx.Node, dim: int, depth: int) -> bool:
    shape, out = ctx.shape(src), ctx.shape(user)
    if shape is None:
        return False
    nd = len(shape)
    if user.op == "call_function" and user.target is F.scaled_dot_product_attention:
        qkv = [arg(user, i, name) for i, name in enumerate(("query", "key", "value"))]
        return src in qkv and dim < nd - 2
    if traits_of(user, ctx.gm).matmul:
        return src in user.args[:2] and dim < nd - 2
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
    if user.op != "call_module" and name in _MOVES and user.args[0] is src:
        if name == "permute":
            rest = list(user.args[1:]) or [user.kwargs["dims"]]
            order = list(rest[0]) if isinstance(rest[0], (list, tuple)) else rest
            moved = [d % nd for d in order].index(dim)
        elif name in ("transpose", "swapaxes"):
            a, b = (d % nd for d in user.args[1:3])
            moved = b if dim == a else a if dim == b else dim
        elif name == "unsqueeze":
            d = arg(user, 1, "dim") % (nd + 1)
            moved = dim + (d <= dim)
        else:  # unbind: each piece, without the unbound dim, is taken by a getitem
            d = arg(user, 1, "dim", 0) % nd
            if d == dim or not user.users:
                return False
            return all(
                p.op == "call_function"
                and p.target is operator.getitem
                and _carries_to_a_batch_dim(ctx, p, dim - (d < dim), depth + 1)
                for p in user.users
            )
        return _carries_to_a_batch_dim(ctx, user, moved, depth + 1)
    if user.op != "call_module" and name in _ALONG:
        moved = _moved_along(ctx, src, user, name, dim)
        if moved == _PIECES:  # chunk / split: each piece is taken by a getitem
            return bool(user.users) and all(
                p.op == "call_function"
                and p.target is operator.getitem
                and _carries_to_a_batch_dim(ctx, p, dim, depth + 1)
                for p in user.users
            )
        return moved is not None and _carries_to_a_batch_dim(ctx, user, moved, depth + 1)
    entry = entry_for(user, ctx.gm, lambda e: e.rule is not None)
    rule = entry.rule if entry is not None else None
    per_element = (
        rule in (passthrough, elementwise)
        or (rule is softmax and arg(user, 1, "dim") % nd != dim)
        or (
            rule in (layer_norm_module, layer_norm_function)
            and dim != nd - 1
            and _last_only(ctx, user)
        )
    )
    if not per_element or out is None or len(out) < nd:
        return False
    moved = dim + len(out) - nd
    return out[moved] == shape[dim] and _carries_to_a_batch_dim(ctx, user, moved, depth + 1)


#: ops that keep a dim they do not act along (rotary embeddings take them between the head
#: split and attention: a slice of the tokens, ``chunk`` / ``cat`` or strided slices,
#: ``stack`` and ``reshape`` of the last dim)
_ALONG = ("getitem", "cat", "concat", "stack", "chunk", "split", "tensor_split", "reshape", "view")
_PIECES = -1


def _moved_along(
    ctx: ChannelContext, src: fx.Node, user: fx.Node, name: str, dim: int
) -> int | None:
    """Where ``user`` (one of :data:`_ALONG`) puts ``src``'s dim ``dim`` untouched: its dim in
    the output, :data:`_PIECES` for each piece of a chunk / split, or None (it acts on it)."""
    shape = ctx.shape(src)
    nd = len(shape)
    if name == "getitem":  # basic indexing: the dim must be taken whole
        if user.args[0] is not src:
            return None
        index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index):
            return None
        out, d = 0, 0
        for i in expand_index(index, nd):
            if i is None:
                out += 1
                continue
            if d == dim:
                return out if i == slice(None) else None
            out, d = out + isinstance(i, slice), d + 1
        return None
    if name in ("cat", "concat", "stack"):
        tensors = user.args[0] if user.args else user.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or src not in tensors:
            return None
        d = arg(user, 1, "dim", 0) % (nd + (name == "stack"))
        if name == "stack":
            return dim + (d <= dim)
        return None if d == dim else dim
    if user.args[0] is not src:
        return None
    if name in ("chunk", "split", "tensor_split"):
        return None if arg(user, 2, "dim", 0) % nd == dim else _PIECES
    out_shape = ctx.shape(user)  # reshape / view: the dims up to this one stay as they were
    ok = out_shape is not None and tuple(out_shape[: dim + 1]) == tuple(shape[: dim + 1])
    return dim if ok else None


def _last_only(ctx: ChannelContext, node: fx.Node) -> bool:
    """Whether a LayerNorm call normalises over its input's last dim only."""
    if node.op == "call_module":
        shape = ctx.gm.get_submodule(str(node.target)).normalized_shape
    else:
        shape = arg(node, 1, "normalized_shape")
    return isinstance(shape, int) or len(tuple(shape)) == 1


# ---- functional layers the canonicalising pass could not lift ----------------------------------
def _not_lifted(ctx: ChannelContext, node: fx.Node) -> Any:
    """Freeze what a functional layer touches, saying why it was not lifted into a module."""
    why = node.meta.get(NOT_LIFTED)
    reason = f"unsupported op: {describe(node, ctx.gm)}" + (f": {why}" if why else "")
    ctx.freeze_args(node, reason)
    return ctx.frozen_output(node, reason)


# F.layer_norm keeps its own rule above (it understands parameters reached by get_attr)
register_function_rule(*(f for f in LIFTABLE if f not in (F.layer_norm, torch.layer_norm)))(
    _not_lifted
)
