"""The rewrite: apply a Plan to the analysed graph and return a new, smaller GraphModule.

Steps: (1) removed blocks — each add is rewired to its shortcut and the dead branch eliminated;
(2) every weight layer is replaced by a pruned copy (conv/linear/BN/LayerNorm/GroupNorm, depthwise
``groups`` updated); (3) parameters used directly in the graph (layer scale, class tokens,
``F.layer_norm`` weights) are sliced along their channel dim; (4) literal channel counts in
``view``/``reshape``/``expand``, split sizes, ``chunk`` and channel slices are recomputed for the
kept channels; (5) lint, dead-module removal, recompile. The analysed graph is not modified.
"""

from __future__ import annotations

import copy
import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from fxprune.errors import PlanError
from fxprune.meta import CHANNELS
from fxprune.passes.prune_rules import lookup_pruner
from fxprune.passes.units import expand_index, varying_dims

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.plan import Plan

__all__ = ["apply_plan"]


def apply_plan(analysis: Analysis, plan: Plan) -> fx.GraphModule:
    """Build the pruned GraphModule for ``plan`` (validated first)."""
    plan.validate(analysis)
    gm = copy.deepcopy(analysis.gm)
    maps = {n.name: n.meta.get(CHANNELS) for n in analysis.gm.graph.nodes}
    keep_unit = analysis.spaces.keep_units(plan.kept)
    nodes = {n.name: n for n in gm.graph.nodes}

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
        in_keep, out_keep = keep_unit[rec.in_units], keep_unit[rec.out_units]
        if in_keep.all() and out_keep.all():
            continue
        try:
            module = gm.get_submodule(rec.target)
        except AttributeError:
            continue  # functional layer (F.layer_norm): its parameters are sliced below
        pruner = lookup_pruner(module)
        if pruner is None:
            raise PlanError(f"No pruner registered for {type(module).__name__} '{rec.target}'.")
        new = pruner(module, in_keep, out_keep)
        for pname, value in list(new.named_parameters(recurse=False)):
            original = getattr(module, pname)
            # modules that shared a parameter (tied weights) share its pruned version too
            setattr(new, pname, tied.setdefault(id(original), value))
        _set_submodule(gm, rec.target, new)

    for root in analysis.spaces.roots:
        if root.kind == "param":
            keep = keep_unit[root.units]
            if not keep.all():
                _slice_parameter(gm, root.name, keep)

    for node in gm.graph.nodes:
        _rewrite_args(node, maps, keep_unit)

    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


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


def _slice_parameter(gm: fx.GraphModule, target: str, keep: np.ndarray) -> None:
    parent_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(parent_name) if parent_name else gm
    value = getattr(owner, attr)
    dim = max(range(value.ndim), key=lambda d: (value.shape[d], d))
    sliced = value.detach().index_select(dim, torch.from_numpy(np.flatnonzero(keep)).long()).clone()
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
    elif (node.op == "call_method" and target in ("split", "chunk")) or (
        node.op == "call_function" and target in (torch.split, torch.chunk)
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
        sizes = []
        for u, meta in zip(outs, node.meta["tensor_meta"], strict=False):
            sizes.append(
                int(keep_unit[u.reshape(-1)].sum()) if u.shape[dim] > 1 else meta.shape[dim]
            )
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
