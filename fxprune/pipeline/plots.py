"""Plots a person would rather see than read (matplotlib is optional: ``fxprune[plot]``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxprune.core.io import atomic_write

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["plot_frontier", "plot_widths"]


def plot_widths(analysis: Analysis, plan: Plan, path: str | os.PathLike) -> Path:
    """Output channels of every conv/linear layer, dense vs pruned, in graph order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep_unit = analysis.spaces.keep_units(plan.kept)
    dead = {n for b in plan.removed_blocks for n in analysis.block(b).region}
    layers = [r for r in analysis.spaces.layers if r.kind in ("conv", "linear")]
    dense = [len(r.out_units) for r in layers]
    kept = [0 if r.node in dead else int(keep_unit[r.out_units].sum()) for r in layers]
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.12), 4))
    x = range(len(layers))
    ax.bar(x, dense, color="#d0d0d0", label="dense", width=0.9)
    ax.bar(x, kept, color="#2f6db3", label="pruned", width=0.9)
    ax.set_xlabel("conv / linear layer (graph order)")
    ax.set_ylabel("output channels")
    removed = f", {len(plan.removed_blocks)} blocks removed" if plan.removed_blocks else ""
    ax.set_title(f"{type(analysis.gm).__name__}: widths per layer{removed}")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """A sweep's frontier: latency ratio to dense against importance kept and, when the
    points were evaluated, against the evaluated value; the dense model is a star, and an
    infeasible budget a cross at the smallest ratio reachable.

    ``rows`` are :meth:`fxprune.SweepResult.table`'s (the dense model first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r.get("point") == "dense"]
    pruned = [r for r in rows if r.get("point") != "dense"]
    feasible = [r for r in pruned if r["feasible"]]
    infeasible = [r for r in pruned if not r["feasible"]]
    panels = [("importance_kept", "importance kept")]
    if any(r["value"] is not None for r in rows):
        panels.append(("value", "evaluated value"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        shown = [r for r in feasible if r[key] is not None]
        ax.plot(
            [r["ratio"] for r in shown],
            [r[key] for r in shown],
            "o-",
            color="#2f6db3",
            label="pruned",
        )
        for r in shown:
            ax.annotate(
                r["budget"],
                (r["ratio"], r[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        for r in dense:
            if r[key] is not None:
                ax.plot([r["ratio"]], [r[key]], "*", color="#d62728", markersize=14, label="dense")
        if infeasible:
            low = min((r[key] for r in shown), default=0.0)
            ax.plot(
                [r["ratio"] for r in infeasible],
                [low] * len(infeasible),
                "x",
                color="#7f7f7f",
                markersize=9,
                label="infeasible (min reachable)",
            )
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency / quality frontier")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
