"""Plots of latency tables and predictions (matplotlib is optional and imported here only)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fxprune.latency.denoise import denoise

if TYPE_CHECKING:
    from fxprune.latency.tables import LayerLatency

__all__ = ["plot_layer_curve", "plot_layer_surface", "plot_predictions"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_surface(layer: LayerLatency, path: str | os.PathLike) -> None:
    """Heatmap of a layer's table over (k_in × k_out), measured counts marked."""
    plt = _pyplot()
    table = np.asarray(layer.table)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(table, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layer.out_grid)), [str(c) for c in layer.out_grid], rotation=90)
    ax.set_yticks(range(len(layer.in_grid)), [str(c) for c in layer.in_grid])
    for i, ci in enumerate(layer.in_grid):
        for j, co in enumerate(layer.out_grid):
            if ci in layer.measured_in and co in layer.measured_out:
                ax.plot(j, i, "o", ms=4, mfc="none", mec="white")
    ax.set_xlabel("kept output channels")
    ax.set_ylabel("kept input channels")
    ax.set_title(f"{layer.node}: {layer.unit}\n(o = measured, rest interpolated in class)")
    fig.colorbar(im, ax=ax, label="latency [ms]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_curve(layer: LayerLatency, path: str | os.PathLike) -> None:
    """The period sweep of a layer: raw figures, their step-preserving fit, the candidates."""
    plt = _pyplot()
    counts = np.asarray(layer.sweep_counts)
    raw = np.asarray(layer.sweep_raw)
    period = layer.period_out if layer.sweep_axis != "in" else layer.period_in
    fit = denoise(counts, raw, period).fitted
    grid = layer.in_grid if layer.sweep_axis == "in" else layer.out_grid
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(counts, raw, "o", ms=3, color="0.5", label="raw median")
    ax.plot(counts, fit, "-", color="tab:blue", lw=1, label=f"denoised (period {period})")
    aligned = counts % period == 0
    ax.plot(counts[aligned], fit[aligned], "s", ms=5, color="tab:green", label="aligned counts")
    for c in grid:
        if counts.min() <= c <= counts.max():
            ax.axvline(c, color="tab:orange", ls="--", lw=0.8, alpha=0.7)
    ax.plot([], [], "--", color="tab:orange", label="candidate counts")
    ax.set_xlabel(f"{'input' if layer.sweep_axis == 'in' else 'output'} channels")
    ax.set_ylabel("latency [ms]")
    ax.set_title(f"{layer.node}: {layer.unit}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_predictions(
    measured: Sequence[float],
    predicted: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Predicted vs measured latency, one series per model, with the y = x line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    m = np.asarray(measured, float)
    lo, hi = m.min(), m.max()
    for (name, pred), marker in zip(predicted.items(), "os^vD", strict=False):
        p = np.asarray(pred, float)
        err = np.median(np.abs(p / m - 1))
        ax.plot(m, p, marker, ms=5, alpha=0.8, label=f"{name} (median err {err:.1%})")
        lo, hi = min(lo, p.min()), max(hi, p.max())
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
    ax.set_xlabel("measured [ms]")
    ax.set_ylabel("predicted [ms]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
