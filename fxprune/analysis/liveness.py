"""Peak activation memory: which activations are alive at each node, and their bytes.

The definition ``CompileConfig.max_activation_bytes`` limits. The graph runs its nodes in
order; a node's output is allocated when the node runs and freed once its last user has run
(what the graph returns stays alive to the end). The *live set* at node ``n`` is every
activation produced at or before ``n`` and used at or after it, so a node's inputs and its
output count together. The *peak* is the largest live set's bytes (``numel × element size``
from ``tensor_meta``, i.e. at the example inputs' batch and resolution).

What counts as an activation: every tensor value of the graph, the model's inputs
(placeholders) included; parameters and buffers (``get_attr``) do not. Buffers are nominal:
each node's output is its own buffer, so views (``reshape``, ``flatten``) and in-place results
count as new tensors — an upper bound of what an aliasing runtime holds. A node returning a
tuple (``chunk``, ``split``) is one buffer of all its tensors; ``getitem`` on it is a view
that keeps it alive.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.core.meta import TENSOR_META

__all__ = ["activation_bytes", "buffer_of", "live_sets", "peak_activation_bytes"]


def activation_bytes(meta: Any) -> int:
    """Bytes of the tensors a ``tensor_meta`` describes (a tuple's or dict's summed)."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return int(np.prod(meta.shape, dtype=np.int64)) * meta.dtype.itemsize
    if isinstance(meta, (tuple, list)):
        return sum(activation_bytes(m) for m in meta)
    if isinstance(meta, dict):
        return sum(activation_bytes(m) for m in meta.values())
    return 0


def buffer_of(node: fx.Node) -> fx.Node | None:
    """The node whose buffer holds ``node``'s value (itself, or the tuple a ``getitem``
    reads), None when it is no activation (a parameter, an int, the graph's output node)."""
    if node.op in ("get_attr", "output"):
        return None
    if (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and not hasattr(node.args[0].meta.get(TENSOR_META), "shape")
    ):
        return buffer_of(node.args[0])
    return node if activation_bytes(node.meta.get(TENSOR_META)) > 0 else None


def live_sets(graph: fx.Graph) -> list[tuple[fx.Node, tuple[fx.Node, ...]]]:
    """Per node in execution order, the buffers alive while it runs (see the module doc)."""
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(order):
        for v in (n, *n.all_input_nodes):
            b = buffer_of(v)
            if b is not None:
                last[b] = max(last.get(b, index[b]), i)
    out = []
    alive: list[fx.Node] = []
    for i, n in enumerate(order):
        if buffer_of(n) is n:
            alive.append(n)
        out.append((n, tuple(alive)))
        alive = [b for b in alive if last[b] > i]
    return out


def peak_activation_bytes(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None
) -> int:
    """The peak activation memory of ``gm`` in bytes: its largest live set.

    Reads the nodes' ``tensor_meta`` (the rewrite keeps it current); with ``example_inputs``,
    shapes are propagated first (for a graph without them).
    """
    if example_inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    return max(
        (
            sum(activation_bytes(b.meta.get(TENSOR_META)) for b in alive)
            for _, alive in live_sets(gm.graph)
        ),
        default=0,
    )
