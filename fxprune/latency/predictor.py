"""End-to-end latency of a sub-network: Σ per-layer tables + a constant, calibrated on measurements.

``predict(plan) = a · Σ_live layers C_l[k_in, k_out] + b``. Layers inside removed blocks are
dead and cost 0; kept counts come from :meth:`Analysis.layer_keep` (so a layer reading several
groups sees the total). Before calibration ``a = 1`` and ``b`` is the constant part of the
tables (dense whole-model latency − Σ tables at full width). A model's end-to-end time is not
exactly the sum of its units — stand-alone ops (pooling, adds) scale with widths too, and a
whole graph has cache and scheduling effects that units measured alone do not —
so :meth:`LatencyModel.calibrate` fits ``a`` and ``b`` on a few measured sub-networks, by least
squares on the *relative* error ``(a·Σ + b) / measured − 1`` (the error we report).

:class:`MacsModel` is the FLOPs-proportional baseline peers use (``a · MACs + b``), calibrated
the same way, so the two can be compared on the same sub-networks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from fxprune.backends import Backend, MeasureConfig, Measurement, SessionMeasurement
from fxprune.core.meta import TENSOR_META
from fxprune.core.plan import Plan

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.latency.tables import LatencyTables

__all__ = [
    "Calibration",
    "LatencyModel",
    "MacsModel",
    "fit_relative",
    "fit_relative_multi",
    "live_layer_counts",
    "relative_errors",
]


def live_layer_counts(analysis: Analysis, plan: Plan) -> dict[str, tuple[int, int]]:
    """Kept (in, out) counts of every conv/linear/norm call and attention unit outside the
    plan's removed blocks."""
    dead = {n for b in plan.removed_blocks for n in analysis.block(b).region}
    keep_unit = analysis.spaces.keep_units(dict(plan.kept))
    counts = {**analysis.layer_keep(keep_unit), **analysis.attention_keep(keep_unit)}
    return {n: k for n, k in counts.items() if n not in dead}


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    """``|predicted / measured − 1|`` element-wise."""
    return np.abs(np.asarray(predicted, float) / np.asarray(measured, float) - 1.0)


@dataclass(frozen=True)
class Calibration:
    """A fitted ``a·x + b`` and its relative errors on the points it was fitted to."""

    a: float
    b: float
    n: int
    errors_before: tuple[float, ...]
    errors_after: tuple[float, ...]
    per_layer: float = 0.0  # ms per live layer (LatencyModel with per_layer=True)

    @property
    def median_error(self) -> float:
        return float(np.median(self.errors_after))

    @property
    def max_error(self) -> float:
        return float(np.max(self.errors_after))

    def __str__(self) -> str:
        before = float(np.median(self.errors_before))
        return (
            f"calibrated on {self.n} points: a={self.a:.4g}, b={self.b:.4g} ms; median |pred/meas"
            f"-1| {before:.1%} -> {self.median_error:.1%} (max {self.max_error:.1%})"
        )


def fit_relative_multi(features: np.ndarray, y: Sequence[float]) -> np.ndarray:
    """Coefficients ``w`` (last one the intercept) minimising Σ ((F·w) / y − 1)².

    ``features`` is ``(n_points, k)``; a column of ones is appended for the intercept.
    """
    f, y = np.asarray(features, float), np.asarray(y, float)
    if len(y) == 0 or np.any(y <= 0):
        raise ValueError("calibration needs at least one positive measurement")
    design = np.concatenate([f, np.ones((len(y), 1))], axis=1) / y[:, None]
    w, *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    return w


def fit_relative(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``(a, b)`` minimising Σ ((a·x + b) / y − 1)²; with one distinct x, ``b = 0``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0 or np.any(y <= 0):
        raise ValueError("calibration needs at least one positive measurement")
    if len(np.unique(x)) < 2:
        return float(np.sum(x / y) / np.sum((x / y) ** 2)), 0.0
    design = np.stack([x / y, 1.0 / y], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    return float(a), float(b)


class _Linear:
    """Shared ``a·x(plan) + b`` machinery."""

    a: float
    b: float

    def feature(self, plan: Plan) -> float:
        raise NotImplementedError

    def predict(self, plan: Plan) -> float:
        """Predicted latency (ms) of the sub-network ``plan`` describes."""
        return self.a * self.feature(plan) + self.b

    def fit(
        self, plans: Sequence[Plan], measured: Sequence[float], extra: Sequence[tuple[float, float]]
    ) -> Calibration:
        xs = [self.feature(p) for p in plans] + [x for x, _ in extra]
        ys = list(measured) + [y for _, y in extra]
        before = relative_errors([self.a * x + self.b for x in xs], ys)
        self.a, self.b = fit_relative(xs, ys)
        after = relative_errors([self.a * x + self.b for x in xs], ys)
        return Calibration(self.a, self.b, len(xs), tuple(before), tuple(after))


class LatencyModel(_Linear):
    """Predicts and measures sub-network latency from measured tables.

    Args:
        analysis: the analysed model the tables were built for.
        tables: from :func:`fxprune.latency.tables.annotate_latency`.
        backend: measures whole (pruned) models; the tables' backend.
        measure_config: timing settings for whole-model measurements.
        sessions: whole models are timed over this many fresh sessions (runs go round them
            in short bursts) where the backend supports it (ONNX Runtime).
    """

    def __init__(
        self,
        analysis: Analysis,
        tables: LatencyTables,
        backend: Backend | None = None,
        *,
        measure_config: MeasureConfig | None = None,
        sessions: int = 1,
    ) -> None:
        self.analysis = analysis
        self.sessions = sessions
        self.tables = tables
        self.backend = backend
        self.measure_config = measure_config or MeasureConfig(warmup=5, repeats=30)
        self.a = 1.0
        self.b = tables.constant_ms
        self.per_layer = 0.0
        self.calibration: Calibration | None = None
        #: per layer, in-model time / alone time (:mod:`fxprune.latency.in_model`); default 1
        self.scales: dict[str, float] = {}

    def set_scales(self, scales: Mapping[str, float]) -> None:
        """Scale layers to their in-model cost; the constant is re-derived from the dense model."""
        self.scales = dict(scales)
        self.a, self.per_layer = 1.0, 0.0
        self.b = self.tables.dense_ms - self.feature(Plan.empty(self.analysis))

    def layer_cost(self, name: str, k_in: int, k_out: int) -> float:
        """One layer's cost (ms) at the given counts: its table, times its in-model scale."""
        return self.scales.get(name, 1.0) * self.tables.layers[name].cost(k_in, k_out)

    def predict(self, plan: Plan) -> float:
        """Predicted latency (ms): ``a·Σ tables + per_layer·(live layers) + b``."""
        costs = self.layer_costs(plan)
        return self.a * float(sum(costs.values())) + self.per_layer * len(costs) + self.b

    def layer_costs(self, plan: Plan) -> dict[str, float]:
        """Table cost (ms) of every live table unit (conv, linear, attention) at the plan's
        kept counts."""
        counts = live_layer_counts(self.analysis, plan)
        return {
            name: self.layer_cost(name, *counts[name])
            for name in self.tables.layers
            if name in counts
        }

    def off_grid(self, plan: Plan) -> list[str]:
        """Layers whose kept counts are not table entries (their cost is interpolated)."""
        counts = live_layer_counts(self.analysis, plan)
        return [
            n
            for n, lat in self.tables.layers.items()
            if n in counts and not lat.on_grid(*counts[n])
        ]

    def feature(self, plan: Plan) -> float:
        """Σ of the live layers' table costs (ms)."""
        return float(sum(self.layer_costs(plan).values()))

    def measure(
        self, module_or_plan: nn.Module | Plan, config: MeasureConfig | None = None
    ) -> Measurement:
        """Measure a pruned module (or the module ``plan`` makes) whole on the backend."""
        if self.backend is None:
            raise ValueError("LatencyModel.measure needs a backend; pass backend= when creating it")
        if isinstance(module_or_plan, Plan):
            from fxprune.rewrite.api import prune

            module_or_plan = prune(self.analysis, module_or_plan)
        config = config or self.measure_config
        inputs = self.analysis.example_inputs
        if isinstance(self.backend, SessionMeasurement) and self.sessions > 1:
            return self.backend.measure_sessions(module_or_plan, inputs, config, self.sessions)
        return self.backend.measure(module_or_plan, inputs, config)

    def calibrate(
        self,
        plans: Sequence[Plan],
        measured: Sequence[float] | None = None,
        *,
        include_dense: bool = True,
        per_layer: bool = False,
    ) -> Calibration:
        """Fit ``a``, ``b`` so predictions match whole-model measurements of ``plans``.

        Args:
            measured: figures (ms) for ``plans``; measured on the backend when omitted.
            include_dense: also fit the dense model's figure from the tables (free).
            per_layer: also fit a cost per live layer. A unit timed alone pays a fixed
                overhead per kernel that it does not pay inside a model (cold thread pool, cold
                caches), which a slope cannot absorb when removed blocks change the number of
                layers. Needs at least four points.
        """
        if measured is None:
            measured = [self.measure(p).median_ms for p in plans]
        if not per_layer:
            dense = self.feature(Plan.empty(self.analysis))
            extra = [(dense, self.tables.dense_ms)] if include_dense else []
            self.per_layer = 0.0
            self.calibration = self.fit(plans, measured, extra)
            return self.calibration
        rows = [(self.feature(p), len(self.layer_costs(p))) for p in plans]
        ys = list(measured)
        if include_dense:
            rows.append((self.feature(Plan.empty(self.analysis)), len(self.tables.layers)))
            ys.append(self.tables.dense_ms)
        if len(ys) < 4:
            raise ValueError(f"per-layer calibration needs at least 4 points, got {len(ys)}")
        before = relative_errors([self.a * x + self.per_layer * n + self.b for x, n in rows], ys)
        self.a, self.per_layer, self.b = (float(v) for v in fit_relative_multi(np.array(rows), ys))
        after = relative_errors([self.a * x + self.per_layer * n + self.b for x, n in rows], ys)
        self.calibration = Calibration(
            self.a, self.b, len(ys), tuple(before), tuple(after), self.per_layer
        )
        return self.calibration


class MacsModel(_Linear):
    """The FLOPs-proportional baseline: ``latency = a · MACs + b``.

    Uncalibrated it is purely proportional (``b = 0``), anchored at the dense figure.
    """

    def __init__(self, analysis: Analysis, dense_ms: float | None = None) -> None:
        self.analysis = analysis
        self._per = _macs_factors(analysis)
        dense = self.macs(Plan.empty(analysis))
        self.a = (dense_ms / dense) if dense_ms else 1.0
        self.b = 0.0
        self.dense_ms = dense_ms
        self.calibration: Calibration | None = None

    def macs(self, plan: Plan) -> int:
        """Multiply-accumulates of the live conv and linear layers under ``plan``."""
        counts = live_layer_counts(self.analysis, plan)
        total = 0
        for name, (positions, kernel, mode) in self._per.items():
            if name not in counts:
                continue
            k_in, k_out = counts[name]
            per_out = 1 if mode == "dw" else k_in // mode
            total += positions * k_out * per_out * kernel
        return int(total)

    def feature(self, plan: Plan) -> float:
        return float(self.macs(plan))

    def calibrate(
        self, plans: Sequence[Plan], measured: Sequence[float], *, include_dense: bool = True
    ) -> Calibration:
        """Fit ``a``, ``b`` on measured figures (ms) of ``plans`` (and the dense figure)."""
        extra = []
        if include_dense and self.dense_ms:
            extra = [(self.feature(Plan.empty(self.analysis)), self.dense_ms)]
        self.calibration = self.fit(plans, measured, extra)
        return self.calibration


def _macs_factors(analysis: Analysis) -> Mapping[str, tuple[int, int, int | str]]:
    """Per conv/linear layer: output positions per channel, kernel volume, group rule."""
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, tuple[int, int, int | str]] = {}
    for rec in analysis.spaces.layers:
        if rec.kind not in ("conv", "linear"):
            continue
        m = gm.get_submodule(rec.target)
        shape = tuple(nodes[rec.node].meta[TENSOR_META].shape)
        if isinstance(m, nn.Linear):
            out[rec.node] = (int(np.prod(shape)) // m.out_features, 1, 1)
        else:
            dw = m.groups > 1 and m.groups == m.in_channels  # one input per output (×k)
            positions = int(np.prod(shape)) // m.out_channels
            out[rec.node] = (positions, int(np.prod(m.kernel_size)), "dw" if dw else m.groups)
    return out
