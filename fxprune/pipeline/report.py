"""Reports on an analysis and a plan: groups, blocks, prunable weights, parameters and MACs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.core.meta import TENSOR_META

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = [
    "analysis_report",
    "count_macs",
    "count_params",
    "prunable_fraction",
    "render_markdown",
    "rounds_markdown",
]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None) -> int:
    """Multiply-accumulates of conv and linear layers (the FLOPs peers count, ×½).

    Reads the nodes' ``tensor_meta`` (the rewrite keeps it current); with ``example_inputs``,
    shapes are propagated first (for a graph without them).
    """
    if example_inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        meta = node.meta.get(TENSOR_META)
        if meta is None or not hasattr(meta, "shape"):
            continue
        out = int(np.prod(meta.shape))
        if isinstance(m, nn.modules.conv._ConvNd):
            total += out * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        elif isinstance(m, nn.Linear):
            total += out * m.in_features
    return total


def prunable_fraction(analysis: Analysis) -> dict[str, float]:
    """Share of conv/linear weight elements in a layer with a prunable input or output group.

    ``prunable`` counts inexact groups (LayerNorm, GroupNorm) as prunable; ``exact`` does not.
    A group must be unfrozen and have at least two indices (one can never be emptied).
    """
    spaces = analysis.spaces
    # Denominator: every weight matrix/kernel of a conv, linear or attention module, including
    # those the analysis could not see into (opaque modules, weights used functionally).
    total = sum(
        p.numel()
        for m in analysis.gm.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention))
        for p in m.parameters(recurse=False)
        if p.ndim >= 2
    )
    prunable = exact = 0
    seen: set[str] = set()
    for rec in spaces.layers:
        if rec.kind == "norm" or rec.target in seen:
            continue
        seen.add(rec.target)
        numel = analysis.gm.get_submodule(rec.target).weight.numel()
        gids = spaces.groups_of(rec.in_units) + spaces.groups_of(rec.out_units)
        groups = [
            spaces.groups[i]
            for i in gids
            if not spaces.groups[i].frozen and spaces.groups[i].size > 1
        ]
        if groups:
            prunable += numel
        if any(not g.inexact for g in groups):
            exact += numel
    return {
        "weights": total,
        "prunable": prunable / total if total else 0.0,
        "exact": exact / total if total else 0.0,
    }


def analysis_report(
    analysis: Analysis, plan: Plan | None = None, pruned: fx.GraphModule | None = None
) -> dict[str, Any]:
    """A JSON-ready report: per group its members, size and status; blocks; counts."""
    layer_of: dict[int, list[str]] = {}
    for rec in analysis.spaces.layers:
        for role, units in (("in", rec.in_units), ("out", rec.out_units)):
            for gid in analysis.spaces.groups_of(units):
                tag = f"{rec.target}:{role}"
                if tag not in layer_of.setdefault(gid, []):
                    layer_of[gid].append(tag)
    kept = plan.kept if plan is not None else {}
    groups = []
    for gid, g in enumerate(analysis.groups):
        groups.append(
            {
                "name": g.name,
                "size": g.size,
                "kept": len(kept.get(g.name, range(g.size))),
                "status": "frozen" if g.frozen else ("inexact" if g.inexact else "prunable"),
                "reasons": list(g.frozen or g.inexact)[:3],
                "members": layer_of.get(gid, []),
                "equal_count_segments": [len(p) for p in g.equal_count],
            }
        )
    removed = set(plan.removed_blocks) if plan is not None else set()
    blocks = [
        {
            "name": b.name,
            "shortcut": b.shortcut,
            "branch": b.branch,
            "nodes": len(b.region),
            "internal_groups": analysis.internal_groups(b),
            "removed": b.name in removed,
        }
        for b in analysis.blocks
    ]
    fraction = prunable_fraction(analysis)
    report: dict[str, Any] = {
        "model": type(analysis.gm).__name__,
        "signature": analysis.signature,
        "frontend": analysis.frontend,
        "input_shapes": [list(t.shape) for t in analysis.example_inputs],
        "groups": groups,
        "blocks": blocks,
        "summary": {
            "groups": len(groups),
            "prunable_groups": sum(g["status"] != "frozen" for g in groups),
            "blocks": len(blocks),
            "prunable_weight_fraction": fraction["prunable"],
            "exact_prunable_weight_fraction": fraction["exact"],
            "params_before": count_params(analysis.gm),
            "macs_before": count_macs(analysis.gm),
        },
    }
    if pruned is not None:
        report["summary"]["params_after"] = count_params(pruned)
        report["summary"]["macs_after"] = count_macs(pruned)  # the rewrite refreshed its shapes
        report["summary"]["removed_blocks"] = len(removed)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary, then one row per group and per block."""
    s = report["summary"]
    lines = [f"# fxprune report — {report['model']}", ""]
    lines += ["| quantity | value |", "|---|---|"]
    for k, v in s.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4g} |")
        elif isinstance(v, int) and not isinstance(v, bool):
            lines.append(f"| {k} | {v:,} |")
        else:
            lines.append(f"| {k} | {v} |")
    lines += ["", "## Coupling groups", "", "| group | size | kept | status | members | why |"]
    lines += ["|---|---:|---:|---|---|---|"]
    for g in report["groups"]:
        members = ", ".join(g["members"][:4]) + (" …" if len(g["members"]) > 4 else "")
        lines.append(
            f"| {g['name']} | {g['size']} | {g['kept']} | {g['status']} | {members} | "
            f"{'; '.join(g['reasons'])[:160]} |"
        )
    lines += ["", "## Removable blocks", "", "| block | shortcut | branch | nodes | removed |"]
    lines += ["|---|---|---|---:|---|"]
    for b in report["blocks"]:
        lines.append(
            f"| {b['name']} | {b['shortcut']} | {b['branch']} | {b['nodes']} | {b['removed']} |"
        )
    return "\n".join(lines) + "\n"


def _confirmed(r: Mapping[str, Any]) -> str:
    """A note on a round measured more than once (its figure is their mean)."""
    n = r.get("measurements", 1)  # reports from before the confirming measurement lack it
    return f" (mean of {n})" if n > 1 else ""


def rounds_markdown(rounds: Sequence[Mapping[str, Any]]) -> str:
    """The budget rounds of a compile report (``report["rounds"]``) as a Markdown table."""
    export = any("export" in r for r in rounds)
    lines = ["", "## Budget rounds", ""]
    head = "| round | target ms | predicted ms | measured ms | dense ms | budget ms | met |"
    lines += [head + (" export (gathers, slices) |" if export else "")]
    lines += ["|---:|---:|---:|---:|---:|---:|---|" + ("---|" if export else "")]
    for r in rounds:
        row = (
            f"| {r['round']} | {r['target_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{r['measured_ms']:.3f}{_confirmed(r)} | {r['dense_ms']:.3f} | {r['budget_ms']:.3f} | "
            f"{r['met']} |"
        )
        if export:
            e = r.get("export", {})
            row += f" {e.get('kept', '—')} ({e.get('gathers', 0)}, {e.get('slices', 0)}) |"
        lines.append(row)
    return "\n".join(lines) + "\n"
