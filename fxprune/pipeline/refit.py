"""The budget loop's latency model, refitted on what each round measured.

The solver prices a plan as ``a·Σ + p·n + b``: ``Σ`` the live layers' table costs, ``n`` how
many layers are live, ``b`` the rest of the model. The tables time each unit alone, so what a
layer costs *around* its units is invisible to them: a removed residual block also takes its
non-unit ops (the squeeze-excite multiply, the residual add, activations between units) and
the runtime's per-kernel overhead with it, all of which the uncalibrated model leaves in the
constant. timm's EfficientNet-B0 at 0.3 on ORT: the first plan removed 9 blocks and measured
0.86 ms against 2.49 ms predicted; a line in ``Σ`` alone through that point and the dense one
then put every later plan 13-29% over the budget.

Two steps, in :func:`refit`:

1. **Shape.** When the measured plans differ in their live layer counts, the per-layer cost
   ``p`` is identifiable and fitted (``a`` held at its previous value while there are fewer
   than four points; all three with four or more). Otherwise ``p = 0`` and ``a·Σ + b`` is fitted
   as before. A fit that turns absurd (``a`` outside [0.2, 5] or ``p < 0``) is not used.
2. **Secant.** The feature ``F = a·Σ + p·n`` orders plans by predicted cost, and the solver's
   constraint ``α·F + β ≤ target`` is a limit on ``F`` alone: the loop is a search over one
   number. When the measured points bracket the budget (a plan at or under it, and one with a
   larger ``F`` over it, the dense model included), the line goes through the two bracketing
   points nearest the budget, with the Illinois rule against one-sided convergence.

Every plan's figure is first scaled by (latest dense / dense measured beside it): the host
drifts by 10% and more between rounds, and fitting raw figures taken at different drift
levels made EfficientNet-B0 chase its budget for four rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fxprune.analysis import Analysis
from fxprune.core.plan import Plan
from fxprune.latency.predictor import LatencyModel, fit_relative, fit_relative_multi

__all__ = ["bracket", "illinois", "refit"]

Point = tuple[float, float]  # (feature, measured ms)

_SLOPES = (0.2, 5.0)  # a slope outside this range is a fit to noise, not to the runtime


def refit(
    latency: LatencyModel,
    analysis: Analysis,
    points: Sequence[tuple[Plan, float, float]],
    dense_ms: float,
    budget_ms: float | None = None,
) -> None:
    """Refit ``latency``'s ``a``, ``per_layer`` and ``b`` in place.

    Args:
        points: ``(plan, measured ms, dense ms measured beside it)``, oldest first.
        dense_ms: the dense model's latest figure; every point is scaled to it.
        budget_ms: the budget the loop aims at; enables the secant step. Without it (the floor
            probe) only the shape is fitted.
    """
    scaled = [(plan, ms * dense_ms / dense) for plan, ms, dense in points]
    plans = [p for p, _ in scaled] + [Plan.empty(analysis)]
    ys = np.array([m for _, m in scaled] + [dense_ms], float)
    costs = [latency.layer_costs(p) for p in plans]  # Σ of a plan's is latency.feature(plan)
    sums = np.array([sum(c.values()) for c in costs], float)
    layers = np.array([len(c) for c in costs], float)
    a, per_layer, b = _shape(sums, layers, ys, latency.a)
    if a is None:  # absurd: keep the slope, move the offset so the last plan is as measured
        a, per_layer = latency.a, latency.per_layer
        b = ys[-2] - a * sums[-2] - per_layer * layers[-2]
    if budget_ms is not None:
        features = a * sums + per_layer * layers
        measured = list(zip(features[:-1], ys[:-1], strict=True))
        pair = bracket([*measured, (features[-1], ys[-1])], budget_ms)
        if pair is not None:
            (x0, y0), (x1, y1) = illinois(pair, measured, budget_ms)
            alpha = (y1 - y0) / (x1 - x0)
            a, per_layer, b = alpha * a, alpha * per_layer, y0 - alpha * x0
    latency.a, latency.per_layer, latency.b = float(a), float(per_layer), float(b)


def _shape(
    sums: np.ndarray, layers: np.ndarray, ys: np.ndarray, a_prior: float
) -> tuple[float | None, float, float]:
    """``(a, per_layer, b)`` fitted to the points, or ``(None, 0, 0)`` when the fit is absurd."""
    if len(np.unique(layers)) >= 2:
        if len(ys) >= 4:
            a, p, b = (float(v) for v in fit_relative_multi(np.stack([sums, layers], 1), ys))
            if _SLOPES[0] <= a <= _SLOPES[1] and p >= 0:
                return a, p, b
        # a held: Σ ((a·Σ + p·n + b) / y − 1)² over p and b
        design = np.stack([layers / ys, 1.0 / ys], axis=1)
        (p, b), *_ = np.linalg.lstsq(design, 1.0 - a_prior * sums / ys, rcond=None)
        if p >= 0:
            return a_prior, float(p), float(b)
    a, b = fit_relative(sums, ys)
    if not _SLOPES[0] <= a <= _SLOPES[1]:
        return None, 0.0, 0.0
    return a, 0.0, b


def bracket(points: Sequence[Point], budget_ms: float) -> tuple[Point, Point] | None:
    """The two ``(feature, ms)`` points that bracket the budget most closely, or None.

    The lower one is the largest feature measured at or under the budget; the upper one the
    smallest feature above it measured over the budget. None when no point is under the
    budget, or none with a larger feature is over it (nothing to interpolate between).
    """
    under = [p for p in points if p[1] <= budget_ms]
    if not under:
        return None
    low = max(under)
    over = [p for p in points if p[1] > budget_ms and p[0] > low[0]]
    if not over:
        return None
    return low, min(over)


def illinois(
    pair: tuple[Point, Point], order: Sequence[Point], budget_ms: float
) -> tuple[Point, Point]:
    """``pair`` with the stale end's distance to the budget halved (the Illinois rule).

    A secant on a bracket converges from one side when the curve bends: the same end stays
    the bracket's round after round and each step gains little. When the last two
    measurements (``order``: the measured plans, oldest first) fell on the same side of the
    budget, the other end has not moved for two rounds; halving its distance to the budget
    moves the next point across.
    """
    (x0, y0), (x1, y1) = pair
    if len(order) >= 2:
        (_, first), (_, second) = order[-2:]
        if first > budget_ms and second > budget_ms:
            y0 = budget_ms - (budget_ms - y0) / 2
        elif first <= budget_ms and second <= budget_ms:
            y1 = budget_ms + (y1 - budget_ms) / 2
    return (x0, y0), (x1, y1)
