"""Pruners: how a module with channel-sized state is shrunk to kept input/output channels.

A pruner is ``pruner(module, in_keep, out_keep) -> new module`` where the masks are boolean
arrays over the module's input and output channels. Register one for any module class that has
a channel rule creating a :class:`~fxprune.passes.channel_context.LayerRecord`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["Pruner", "lookup_pruner", "register_pruner"]

Pruner = Callable[[nn.Module, np.ndarray, np.ndarray], nn.Module]
_PRUNERS: dict[type, Pruner] = {}


def register_pruner(*types: type) -> Callable[[Pruner], Pruner]:
    """Register ``pruner(module, in_keep, out_keep)`` for these module classes."""

    def deco(fn: Pruner) -> Pruner:
        for t in types:
            _PRUNERS[t] = fn
        return fn

    return deco


def lookup_pruner(module: nn.Module) -> Pruner | None:
    for cls in type(module).__mro__:
        if cls in _PRUNERS:
            return _PRUNERS[cls]
    return None


def _param(t: torch.Tensor | None, index: torch.Tensor, dim: int = 0):
    if t is None:
        return None
    value = t.detach().index_select(dim, index).clone()
    return (
        nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    )


def _idx(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(mask)).long()


@register_pruner(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def prune_conv(m: nn.Module, in_keep: np.ndarray, out_keep: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    g = m.groups
    if g == m.in_channels == m.out_channels and g > 1:  # depthwise: in and out are one space
        keep = _idx(out_keep)
        new.weight = _param(m.weight, keep)
        new.groups = new.in_channels = new.out_channels = len(keep)
    else:
        cin_g, cout_g = m.in_channels // g, m.out_channels // g
        rows, blocks = [], []
        for gi in range(g):
            o = np.flatnonzero(out_keep[gi * cout_g : (gi + 1) * cout_g]) + gi * cout_g
            i = np.flatnonzero(in_keep[gi * cin_g : (gi + 1) * cin_g])
            w = m.weight.detach()[torch.from_numpy(o).long()][:, torch.from_numpy(i).long()]
            rows.append(o)
            blocks.append(w)
        weight = torch.cat(blocks, 0).clone()
        new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
        new.in_channels = int(in_keep.sum())
        new.out_channels = int(out_keep.sum())
        keep = _idx(out_keep)
    if m.bias is not None:
        new.bias = _param(m.bias, keep)
    return new


@register_pruner(nn.Linear)
def prune_linear(m: nn.Linear, in_keep: np.ndarray, out_keep: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    w = m.weight.detach()[_idx(out_keep)][:, _idx(in_keep)].clone()
    new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = _param(m.bias, _idx(out_keep))
    new.in_features, new.out_features = w.shape[1], w.shape[0]
    return new


@register_pruner(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)
def prune_batch_norm(m: nn.Module, in_keep: np.ndarray, out_keep: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(m, name, None)
        if value is not None:
            setattr(new, name, _param(value, keep))
    new.num_features = len(keep)
    return new


@register_pruner(nn.LayerNorm)
def prune_layer_norm(m: nn.LayerNorm, in_keep: np.ndarray, out_keep: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_keep)
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            setattr(new, name, _param(getattr(m, name), keep))
    new.normalized_shape = (len(keep),)
    return new


@register_pruner(nn.GroupNorm)
def prune_group_norm(m: nn.GroupNorm, in_keep: np.ndarray, out_keep: np.ndarray) -> nn.Module:
    new = copy.deepcopy(m)
    keep = _idx(out_keep)
    if m.affine:
        new.weight, new.bias = _param(m.weight, keep), _param(m.bias, keep)
    new.num_channels = len(keep)
    return new
