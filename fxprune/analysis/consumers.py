"""Consumers: the layer calls an unconstrained plan may give their own input channels.

Found once per analysis (``Analysis.consumers``) and used by unconstrained plans, the channel
layout, the rewrite and the masking oracle; :func:`check_consumers` validates a plan's
per-consumer inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from fxprune.analysis.std_conv import StdConv2d
from fxprune.core.errors import PlanError
from fxprune.core.meta import TENSOR_META

if TYPE_CHECKING:
    from fxprune.analysis.analyze import Analysis
    from fxprune.analysis.channel_context import LayerRecord
    from fxprune.core.plan import Plan

__all__ = ["Consumer", "check_consumers", "find_consumers"]


@dataclass(frozen=True)
class Consumer:
    """A layer call that may keep its own input channels.

    Attributes:
        node: fx node name (the key in ``Plan.consumers``).
        target: module qualified name.
        units: unit id of each input position (length ``n_in``).
        dim: the input's channel dim (1 for conv, last for linear).
        n_in: number of input positions.
        spatial: elements per input channel at batch 1 (H·W for a 2-d conv).
        macs_per_input: multiply-accumulates one input channel costs the layer at batch 1.
        input_node: the node the layer reads; in_shape: that input's shape.
    """

    node: str
    target: str
    units: np.ndarray
    dim: int
    n_in: int
    spatial: int
    macs_per_input: int
    input_node: str
    in_shape: tuple[int, ...]


def find_consumers(analysis: Analysis) -> dict[str, Consumer]:
    """The layer calls an unconstrained plan may give their own input channels, by node name.

    A conv with ``groups > 1`` keeps its groups' channels together and a module called more than
    once would need one set for all calls, so both read what their input tensor keeps.
    """
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    calls: dict[str, int] = {}
    for rec in analysis.spaces.layers:
        calls[rec.target] = calls.get(rec.target, 0) + 1
    out: dict[str, Consumer] = {}
    for rec in analysis.spaces.layers:
        c = _consumer(gm, nodes, rec, calls)
        if c is not None:
            out[c.node] = c
    return out


def _consumer(gm, nodes, rec: LayerRecord, calls: Mapping[str, int]) -> Consumer | None:
    node = nodes.get(rec.node)
    if node is None or node.op != "call_module" or calls[rec.target] != 1:
        return None
    module = gm.get_submodule(rec.target)
    out_meta = node.meta.get(TENSOR_META)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed or isinstance(module, StdConv2d):
            return None  # a standardised weight: dropping its columns changes the rest
        n_in, dim = module.in_channels, 1
        out_spatial = int(np.prod(out_meta.shape[2:])) if out_meta is not None else 1
        macs = module.out_channels * int(np.prod(module.kernel_size)) * out_spatial
    elif isinstance(module, nn.Linear):
        n_in, dim = module.in_features, -1
        rows = int(np.prod(out_meta.shape[1:-1])) if out_meta is not None else 1
        macs = module.out_features * rows
    else:
        return None
    units = np.asarray(rec.in_units).reshape(-1)
    if units.size == 1:
        units = np.repeat(units, n_in)
    if units.size != n_in or n_in < 2 or not node.args:
        return None
    src = node.args[0]
    meta = src.meta.get(TENSOR_META) if hasattr(src, "meta") else None
    if meta is None:
        return None
    shape = tuple(meta.shape)
    dim = dim % len(shape)
    spatial = int(np.prod(shape[1:])) // n_in if len(shape) > 1 else 1
    return Consumer(rec.node, rec.target, units, dim, n_in, spatial, macs, src.name, shape)


def check_consumers(
    analysis: Analysis,
    plan: Plan,
    keep_unit: np.ndarray,
    counts: dict[str, tuple[int, int]],
) -> dict[str, tuple[int, int]]:
    """Validate ``plan.consumers``; return layer (in, out) counts with consumers' own inputs."""
    table = analysis.consumers
    counts = dict(counts)
    for name, idx in plan.consumers.items():
        c = table.get(name)
        if c is None:
            raise PlanError(
                f"'{name}' cannot keep its own input channels: only conv/linear calls with "
                "groups=1 whose module is called once can (others read what their input keeps)."
            )
        if idx and (idx[0] < 0 or idx[-1] >= c.n_in):
            raise PlanError(
                f"Consumer '{name}' has {c.n_in} inputs; index out of range in {idx[:5]}."
            )
        dropped = [i for i in idx if not keep_unit[c.units[i]]]
        if dropped:
            raise PlanError(
                f"Consumer '{name}' keeps input positions {dropped[:5]} that the group plan "
                "removes from its input tensor. A shared tensor keeps the union of what its "
                "consumers read: build the plan with fxprune.unconstrained_plan()."
            )
        counts[name] = (len(idx), counts[name][1])
    return counts
