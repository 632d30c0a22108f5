"""``analyze``: trace a model and run the structural analyses (channel groups, blocks)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from fxprune.analysis.blocks import Block, find_blocks, to_networkx
from fxprune.analysis.canonicalize import canonicalize
from fxprune.analysis.channel_groups import ChannelSpaces, Group, analyze_channels
from fxprune.analysis.consumers import Consumer, find_consumers
from fxprune.analysis.trace import ExampleInputs, bind_inputs, trace
from fxprune.analysis.validate import validate_plan

if TYPE_CHECKING:
    from fxprune.core.plan import Plan

__all__ = ["Analysis", "analyze"]


@dataclass(repr=False)
class Analysis:
    """Everything fxprune knows about a model's structure; the input to plans and rewrites."""

    gm: fx.GraphModule
    spaces: ChannelSpaces
    blocks: list[Block]
    example_inputs: tuple[torch.Tensor, ...]

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

    def layer_keep(self, keep_unit: np.ndarray) -> dict[str, tuple[int, int]]:
        """Kept (in, out) channel counts of every weight layer call under a unit keep mask."""
        return {
            rec.node: (int(keep_unit[rec.in_units].sum()), int(keep_unit[rec.out_units].sum()))
            for rec in self.spaces.layers
        }


def analyze(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    leaf_modules: Iterable[type | str] | None = None,
) -> Analysis:
    """Trace ``model`` (a copy; the original is untouched) and analyse its prunable structure.

    Args:
        model: the model to analyse.
        example_inputs: at a representative size: one tensor, one per positional argument,
            or a dict by argument name; optional arguments not given keep their defaults.
            ``Analysis.example_inputs`` holds the tensors in signature order.
        leaf_modules: module classes or qualified names to keep opaque (their channels freeze).
    """
    inputs = bind_inputs(model, example_inputs).tensors
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    gm = canonicalize(gm)
    spaces = analyze_channels(gm)
    blocks = find_blocks(gm, to_networkx(gm))
    return Analysis(gm, spaces, blocks, tuple(t.detach().clone() for t in inputs))
