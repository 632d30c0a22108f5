"""Plots a person would rather see than read (matplotlib is optional: ``fxprune[plot]``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fxprune.core.io import atomic_write

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["plot_widths"]


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
