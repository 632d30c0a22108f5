"""Pruners: how a module with channel-sized state is shrunk to kept input/output channels.

A pruner is ``pruner(module, in_idx, out_idx) -> new module`` where the index arrays list the
original input and output channels the new module keeps, *in the order it keeps them* (the
rewrite may permute channels to turn gathers into slices, see :mod:`fxprune.unconstrained.layout`).
Register one for any module class that has a channel rule creating a
:class:`~fxprune.analysis.channel_context.LayerRecord`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fxprune.analysis.ops import lookup, register_op
from fxprune.analysis.std_conv import StdConv2d

__all__ = ["Pruner", "lookup_pruner", "register_pruner"]

Pruner = Callable[[nn.Module, np.ndarray, np.ndarray], nn.Module]


def register_pruner(*types: type) -> Callable[[Pruner], Pruner]:
    """Register ``pruner(module, in_idx, out_idx)`` for these module classes (in the op table)."""

    def deco(fn: Pruner) -> Pruner:
        register_op(*types, pruner=fn)
        return fn

    return deco


def lookup_pruner(module: nn.Module) -> Pruner | None:
    """The pruner of the nearest class in the module's MRO that has one."""
    entry = lookup(type(module), lambda e: e.pruner is not None)
    return entry.pruner if entry is not None else None


def _param(t: torch.Tensor | None, index: torch.Tensor, dim: int = 0):
    if t is None:
        return None
    value = t.detach().index_select(dim, index).clone()
    return (
        nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    )


def _idx(index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(index, dtype=np.int64))


@register_pruner(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def prune_conv(m: nn.Module, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    g = m.groups
    keep = _idx(out_idx)
    if g == m.in_channels == m.out_channels and g > 1:  # depthwise: in and out are one space
        new.weight = _param(m.weight, keep)
        new.groups = new.in_channels = new.out_channels = len(keep)
    elif g == m.in_channels and g > 1:  # depthwise with k outputs per input: rows c*k .. c*k+k-1
        k = m.out_channels // g
        rows = (np.asarray(in_idx)[:, None] * k + np.arange(k)).reshape(-1)
        if not np.array_equal(rows, np.asarray(out_idx)):
            raise ValueError(f"a depthwise conv ×{k} keeps each input's {k} outputs, in its order")
        new.weight = _param(m.weight, keep)
        new.groups = new.in_channels = len(in_idx)
        new.out_channels = len(out_idx)
    else:
        cin_g, cout_g = m.in_channels // g, m.out_channels // g
        in_idx, out_idx = np.asarray(in_idx), np.asarray(out_idx)
        blocks = []
        for gi in range(g):
            o = out_idx[(out_idx >= gi * cout_g) & (out_idx < (gi + 1) * cout_g)]
            i = in_idx[(in_idx >= gi * cin_g) & (in_idx < (gi + 1) * cin_g)] - gi * cin_g
            blocks.append(m.weight.detach()[_idx(o)][:, _idx(i)])
        if g > 1 and np.any(np.diff(out_idx) < 0):  # blocks are stacked group by group
            raise ValueError(f"grouped conv outputs must stay in order, got {out_idx[:8]}...")
        weight = torch.cat(blocks, 0).clone()
        new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
        new.in_channels = len(in_idx)
        new.out_channels = len(out_idx)
    if m.bias is not None:
        new.bias = _param(m.bias, keep)
    return new


@register_pruner(StdConv2d)
def prune_std_conv(m: StdConv2d, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = prune_conv(m, in_idx, out_idx)
    if m.gain is not None:  # per output channel; the dense scale stays
        new.gain = _param(m.gain, _idx(out_idx))
    return new


@register_pruner(nn.Linear)
def prune_linear(m: nn.Linear, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    w = m.weight.detach()[_idx(out_idx)][:, _idx(in_idx)].clone()
    new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = _param(m.bias, _idx(out_idx))
    new.in_features, new.out_features = w.shape[1], w.shape[0]
    return new


@register_pruner(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)
def prune_batch_norm(m: nn.Module, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_idx)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(m, name, None)
        if value is not None:
            setattr(new, name, _param(value, keep))
    new.num_features = len(keep)
    return new


@register_pruner(nn.LayerNorm)
def prune_layer_norm(m: nn.LayerNorm, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_idx)
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            setattr(new, name, _param(getattr(m, name), keep))
    new.normalized_shape = (len(keep),)
    return new


@register_pruner(nn.GroupNorm)
def prune_group_norm(m: nn.GroupNorm, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_idx)
    if m.affine:
        new.weight, new.bias = _param(m.weight, keep), _param(m.bias, keep)
    new.num_channels = len(keep)
    return new
