"""``analyze``: trace a model and run the structural analyses (channel groups, blocks)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from fxprune.analysis.attention_units import (
    AttentionRecord,
    attention_full_counts,
    attention_layers,
)
from fxprune.analysis.blocks import Block, find_blocks, to_networkx
from fxprune.analysis.canonicalize import canonicalize
from fxprune.analysis.channel_groups import ChannelSpaces, Group, analyze_channels
from fxprune.analysis.channel_rules import ATTENTION, DEFAULT_ATTENTION
from fxprune.analysis.consumers import Consumer, find_consumers
from fxprune.analysis.expand_attention import expand_attention
from fxprune.analysis.export_frontend import capture, from_exported
from fxprune.analysis.trace import BoundInputs, ExampleInputs, bind_inputs, trace
from fxprune.analysis.validate import validate_plan
from fxprune.core.errors import ConfigError, ShapeError, TraceError

if TYPE_CHECKING:
    from fxprune.core.plan import Plan

__all__ = ["FRONTENDS", "Analysis", "analyze"]

logger = logging.getLogger(__name__)

#: how a model becomes a graph: symbolic tracing, torch.export, or fx first and export if fx fails
FRONTENDS = ("fx", "export", "auto")


@dataclass(repr=False)
class Analysis:
    """Everything fxprune knows about a model's structure; the input to plans and rewrites."""

    gm: fx.GraphModule
    spaces: ChannelSpaces
    blocks: list[Block]
    example_inputs: tuple[torch.Tensor, ...]
    #: the front end that captured the graph: ``"fx"`` or ``"export"``
    frontend: str = "fx"
    #: what multi-head attention offers as indices: ``"head_dim"``, ``"heads"`` or ``"auto"``
    attention: str = DEFAULT_ATTENTION

    def __repr__(self) -> str:
        """One line: the model, its groups and blocks, the input shapes, the signature."""
        prunable = sum(g.prunable for g in self.groups)
        shapes = ", ".join("×".join(map(str, t.shape)) or "scalar" for t in self.example_inputs)
        return (
            f"Analysis({self.gm.__class__.__name__}: {len(self.groups)} groups ({prunable} "
            f"prunable), {len(self.blocks)} blocks, inputs {shapes}, signature {self.signature})"
        )

    @property
    def groups(self) -> list[Group]:
        return self.spaces.groups

    @property
    def signature(self) -> str:
        """Fingerprint of what a Plan refers to: group names and sizes, block names."""
        payload = json.dumps(
            [[(g.name, g.size) for g in self.groups], [b.name for b in self.blocks]]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @cached_property
    def consumers(self) -> dict[str, Consumer]:
        """The layer calls that may keep their own input channels (unconstrained plans)."""
        return find_consumers(self)

    def validate_plan(self, plan: Plan) -> None:
        """Raise :class:`~fxprune.PlanError` unless ``plan`` can be applied to this model."""
        validate_plan(self, plan)

    def group(self, name: str) -> Group:
        return self.spaces.group(name)

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def internal_groups(self, block: Block) -> list[str]:
        """Groups whose every root is produced inside the block (they vanish with it)."""
        targets = {
            str(n.target)
            for n in self.gm.graph.nodes
            if n.name in block.region and n.op in ("call_module", "call_function")
        }
        names = {n.name for n in self.gm.graph.nodes if n.name in block.region}
        out = []
        for g in self.groups:
            layer_roots = [r for r in self.spaces.roots if r.name in g.roots and r.kind != "param"]
            if layer_roots and all(r.name in targets or r.name in names for r in layer_roots):
                out.append(g.name)
        return out

    @cached_property
    def attention_layers(self) -> list[AttentionRecord]:
        """SDPA calls whose cost pruning changes: latency units of kind ``"attention"``
        (:mod:`fxprune.analysis.attention_units`); not weight layers (``spaces.layers``)."""
        return attention_layers(self.gm)

    @cached_property
    def _attention_full(self) -> dict[str, tuple[int, int]]:
        """Unpruned (in, out) counts of every attention unit, by node name."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        return {r.node: attention_full_counts(nodes[r.node], r) for r in self.attention_layers}

    def attention_keep(self, keep_unit: np.ndarray) -> dict[str, tuple[int, int]]:
        """Kept (in, out) counts of every attention unit under a unit keep mask (a side
        without channels counts its full size)."""
        out = {}
        for rec in self.attention_layers:
            full_in, full_out = self._attention_full[rec.node]
            k_in = int(keep_unit[rec.in_units].sum()) if rec.in_units.size else full_in
            k_out = int(keep_unit[rec.out_units].sum()) if rec.out_units.size else full_out
            out[rec.node] = (k_in, k_out)
        return out

    def layer_keep(self, keep_unit: np.ndarray) -> dict[str, tuple[int, int]]:
        """Kept (in, out) channel counts of every weight layer call under a unit keep mask."""
        return {
            rec.node: (int(keep_unit[rec.in_units].sum()), int(keep_unit[rec.out_units].sum()))
            for rec in self.spaces.layers
        }


def analyze(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: ExampleInputs | None = None,
    *,
    leaf_modules: Iterable[type | str] | None = None,
    frontend: str = "auto",
    attention: str = DEFAULT_ATTENTION,
) -> Analysis:
    """Capture ``model`` (a copy; the original is untouched) and analyse its prunable structure.

    Args:
        model: the model to analyse, or a ``torch.export.ExportedProgram`` of it (always read
            by the export front end).
        example_inputs: at a representative size: one tensor, one per positional argument,
            or a dict by argument name; optional arguments not given keep their defaults.
            ``Analysis.example_inputs`` holds the tensors in signature order. May be None for
            an ExportedProgram (its own example inputs are used).
        leaf_modules: module classes or qualified names to keep opaque (their channels freeze;
            fx only: export has no leaves).
        frontend: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, ATen ops
            translated to torch-level ones) or ``"auto"``: fx first, export when fx cannot
            trace the model. The one used is ``Analysis.frontend``.
        attention: what a multi-head split (``reshape(B, N, H, D)`` whose head dim reaches
            attention as a batch dim) offers as a group's indices: ``"head_dim"``, its longest
            dim as for any reshape (``D``: each position tied across all heads and across q,
            k, v; heads where ``H > D``), or ``"heads"``, the ``H`` whole heads (each head's
            q, k, v rows, its columns of the output projection, its slice of a per-head bias
            table). One or the other per split: a tensor has one channel dim. ``"auto"`` (the
            default): positions, and whole heads at the splits whose positions freeze (an
            interleaved rotary embedding ``x[..., ::2]`` picks single positions) where heads
            do not; on a model where no split's positions freeze it is ``"head_dim"``.

    Raises:
        TraceError: the model cannot be captured; under ``"auto"``, why under both front ends.
        TypeError: ``example_inputs`` do not bind to the forward's arguments.
    """
    if frontend not in FRONTENDS:
        raise ConfigError(
            f"analyze(frontend=) takes one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}"
        )
    if attention not in ATTENTION:
        raise ConfigError(
            f"analyze(attention=) takes one of {', '.join(map(repr, ATTENTION))}, got {attention!r}"
        )
    name = type(model).__name__
    if isinstance(model, torch.export.ExportedProgram):
        gm, inputs = from_exported(model, example_inputs, name="ExportedProgram")
        used = "export"
    else:
        if example_inputs is None:
            raise TypeError(
                "example_inputs is required for an nn.Module (only an ExportedProgram carries "
                "its own): pass one example tensor per forward argument"
            )
        bound = bind_inputs(model, example_inputs)
        gm, inputs, used = _capture(model, example_inputs, bound, leaf_modules, frontend)
    logger.info("analyze %s: captured with the %s front end", name, used)
    gm = canonicalize(gm)
    expand_attention(gm, tuple(inputs))
    spaces = analyze_channels(gm, attention)
    blocks = find_blocks(gm, to_networkx(gm))
    inputs = tuple(t.detach().clone() for t in inputs)
    return Analysis(gm, spaces, blocks, inputs, used, attention)


def _capture(
    model: nn.Module,
    example_inputs: ExampleInputs,
    bound: BoundInputs,
    leaf_modules: Iterable[type | str] | None,
    frontend: str,
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...], str]:
    """The graph of ``model`` from the front end asked for (``"auto"``: fx, else export)."""
    if frontend == "export":
        return (*_export(model, bound, leaf_modules), "export")
    try:
        return trace(model, example_inputs, leaf_modules=leaf_modules), bound.tensors, "fx"
    except ShapeError:
        raise  # the example inputs do not fit the model: export would run the same ops
    except TraceError as fx_error:
        if frontend == "fx":
            raise
        logger.info("torch.fx could not trace %s; trying torch.export", type(model).__name__)
        try:
            gm, inputs = _export(model, bound, leaf_modules)
        except TraceError as export_error:
            raise TraceError(
                f"{fx_error}\n\ntorch.export could not capture {type(model).__name__} either: "
                f"{export_error}\n\nMake one of them work: for fx, as above; for export, "
                "rewrite value-dependent control flow with torch.cond or torch.where (or "
                "export the model yourself and pass the ExportedProgram)."
            ) from export_error
        return gm, inputs, "export"


def _export(
    model: nn.Module, bound: BoundInputs, leaf_modules: Iterable[type | str] | None
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Capture ``model`` with torch.export and translate it (leaf modules are an fx option:
    export traces into every module, so asking for them is worth a warning). Export is called
    with the tensors as positional arguments: optional arguments after them keep their
    defaults, as under fx."""
    if leaf_modules:
        logger.warning("leaf_modules is an fx option: the export front end ignores it")
    if not bound.positional:
        raise TraceError(
            f"the export front end passes example inputs by position, but these bind "
            f"{', '.join(bound.names)} with other arguments fixed in between or given as "
            "non-tensor values: pass the leading arguments only, or use frontend='fx'"
        )
    inputs = bound.tensors
    return from_exported(capture(model, inputs), inputs, name=type(model).__name__)
