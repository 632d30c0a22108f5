"""Removable blocks: residual branches ``add(x, f(x))`` that can be replaced by ``x``.

On the networkx view of the graph, for every two-input add we try each operand as the shortcut
``s`` and the other as the branch output ``b``. The branch region ``R`` is every node on a path
from ``s`` to ``b``. It is a removable block when ``R`` is single-entry (nothing in ``R`` reads a
value from outside ``R ∪ {s}`` except parameters and constants — so ``s`` dominates ``R``) and
single-exit (nothing outside reads a value from ``R`` except the add — so the add post-dominates
it), it contains at least one weight layer, and the add keeps ``s``'s shape (identity shortcut).
Stochastic depth and layer scale inside the branch are part of ``R``, so they are covered.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from fxprune.core.meta import TENSOR_META

__all__ = ["Block", "find_blocks", "to_networkx"]

_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class Block:
    """A removable residual branch; removing it rewrites ``add`` to ``shortcut``."""

    name: str  # the add node's name
    shortcut: str
    branch: str  # the branch's output node
    region: frozenset[str]  # node names of the branch


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A read-only DiGraph view of the fx graph (node names, edges producer → user)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def find_blocks(gm: fx.GraphModule, graph: nx.DiGraph | None = None) -> list[Block]:
    """Every removable residual block of the graph, in graph order."""
    graph = graph if graph is not None else to_networkx(gm)
    ctx = _Context(gm, graph, {n.name: n for n in gm.graph.nodes}, _dynamic(gm), _dead(gm, graph))
    blocks = []
    for node in gm.graph.nodes:
        if not _is_add(node) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for shortcut, branch in ((a, b), (b, a)):
            block = _block(ctx, node, _through_identity(gm, shortcut), branch)
            if block is not None:
                blocks.append(block)
                break
    return blocks


@dataclass(frozen=True)
class _Context:
    gm: fx.GraphModule
    graph: nx.DiGraph
    nodes: dict[str, fx.Node]
    dynamic: frozenset[str]  # values computed from the inputs
    dead: frozenset[str]  # see _dead


def _dynamic(gm: fx.GraphModule) -> frozenset[str]:
    """The values computed from the inputs. Values computed from parameters and constants alone
    (layer scale's ``gamma.reshape(...)``) may enter a branch anywhere: only these count as a
    second entry."""
    dynamic: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(i.name in dynamic for i in n.all_input_nodes):
            dynamic.add(n.name)
    return frozenset(dynamic)


#: reads with no effect: an unused one may hang off a branch without leaking a value
_PURE_FUNCTIONS = frozenset({getattr, operator.getitem})
_PURE_METHODS = frozenset({"size", "dim"})


def _dead(gm: fx.GraphModule, graph: nx.DiGraph) -> frozenset[str]:
    """Pure reads no path to the output uses (an unused ``B, N, C = x.shape``)."""
    (output,) = (n for n in gm.graph.nodes if n.op == "output")
    live = nx.ancestors(graph, output.name) | {output.name}
    return frozenset(
        n.name
        for n in gm.graph.nodes
        if n.name not in live
        and (
            (n.op == "call_function" and n.target in _PURE_FUNCTIONS)
            or (n.op == "call_method" and n.target in _PURE_METHODS)
        )
    )


def _through_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The value an identity shortcut passes on (timm's ``self.shortcut = nn.Identity()``)."""
    while (
        node.op == "call_module"
        and isinstance(gm.get_submodule(str(node.target)), nn.Identity)
        and len(node.args) == 1
        and isinstance(node.args[0], fx.Node)
    ):
        node = node.args[0]
    return node


def _shape(node: fx.Node):
    meta = node.meta.get(TENSOR_META)
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _block(ctx: _Context, add: fx.Node, s: fx.Node, b: fx.Node) -> Block | None:
    if s is b or _shape(add) is None or _shape(add) != _shape(s):
        return None
    region = (nx.ancestors(ctx.graph, b.name) | {b.name}) & nx.descendants(ctx.graph, s.name)
    if b.name not in region:
        return None
    has_layer = False
    dead_users: set[str] = set()
    for name in region:
        n = ctx.nodes[name]
        for inp in n.all_input_nodes:
            if inp.name not in region and inp is not s and inp.name in ctx.dynamic:
                return None  # a second entry: s does not dominate the branch
        for user in n.users:
            if user.name in ctx.dead:
                dead_users |= {user.name} | nx.descendants(ctx.graph, user.name)
            elif user.name not in region and user is not add:
                return None  # the branch leaks a value: not single-exit
        has_layer |= (
            n.op == "call_module" and any(True for _ in ctx.gm.get_submodule(n.target).parameters())
        ) or (n.op == "call_function" and any(i.op == "get_attr" for i in n.all_input_nodes))
    if not has_layer or set(b.users) != {add}:
        return None
    region |= dead_users  # they go with it
    region = _with_static_feeders(region, ctx.nodes, ctx.dynamic)
    return Block(add.name, s.name, b.name, frozenset(region))


def _with_static_feeders(region: set[str], nodes, dynamic: set[str]) -> set[str]:
    """``region`` plus the parameter-only computations that feed nothing else (Swin V2's
    ``cpb_mlp`` on its coordinate table): they die with the branch, so they belong to it."""
    region = set(region)
    grown = True
    while grown:
        grown = False
        for name in list(region):
            for inp in nodes[name].all_input_nodes:
                if (
                    inp.name not in region
                    and inp.name not in dynamic
                    and inp.op in ("call_module", "call_function", "call_method")
                    and all(u.name in region for u in inp.users)
                ):
                    region.add(inp.name)
                    grown = True
    return region
