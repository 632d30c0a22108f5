"""``fxprune.sweep``: the latency / quality frontier of a model in one call.

:func:`fxprune.compile` for many budgets, sharing what does not depend on the budget: the
model is traced and analysed once, its importance estimated once and its latency tables built
once. Budgets are solved tightest first, each warm-started from the previous budget's plan
(it meets every looser budget), and the latency model's calibration carries over from one
budget to the next. Every point is a full compile result: its pruned model measured side by
side with the dense model, its own budget loop, its norm statistics re-estimated on ``data``,
and, given ``evaluate``, a quality figure of the pruned model (e.g. accuracy).

A budget no plan meets is a point marked infeasible, with the smallest latency the model can
reach, not an error for the whole sweep; a resource limit no plan meets
(:class:`~fxprune.solver.InfeasibleLimit`) applies to every budget and is raised.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.analysis.trace import ExampleInputs
from fxprune.backends import Backend, get_backend, identity_label
from fxprune.core.errors import ConfigError
from fxprune.pipeline.compile import (
    _analyse,
    _budget_loop,
    _choose,
    _dense_result,
    _further_backends,
    _limits_met,
    _Log,
    _measure,
    _norm_statistics,
    _read_prices,
    _result,
    _Run,
    _tables,
)
from fxprune.pipeline.compile import _importance as _importance_stage
from fxprune.pipeline.config import CompileConfig, config_from_keywords
from fxprune.pipeline.result import Budget, CompileResult
from fxprune.solver import InfeasibleBudget

__all__ = ["SWEEP_FILES", "SweepPoint", "SweepResult", "sweep"]

#: The files :meth:`SweepResult.save` writes (and replaces).
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


@dataclass(frozen=True)
class SweepPoint:
    """One budget of a sweep: what was asked, what was measured, what the plan keeps.

    Latencies are in ms; ``measured_ms`` and ``dense_ms`` were measured side by side in the
    chosen round, and ``ratio`` is their quotient. An infeasible point has no plan: its
    ``ratio`` is the smallest reachable latency (``min_latency_ms``) over the dense figure
    the solver used, and its other figures are NaN / 0 / None.
    """

    budget: Budget
    budget_ms: float
    feasible: bool
    budget_met: bool
    dense_ms: float
    measured_ms: float
    ratio: float
    predicted_ms: float
    importance_kept: float
    params: int
    macs: int
    #: ``evaluate(model)`` of this point's model (None: no ``evaluate``, or infeasible)
    value: float | None = None
    #: the smallest latency the model can reach (infeasible points only)
    min_latency_ms: float | None = None
    #: the full compile result of this point (its model, plan, rounds); None when infeasible
    result: CompileResult | None = field(default=None, compare=False, repr=False)

    @property
    def model(self) -> nn.Module | None:
        """This point's pruned model (None when infeasible)."""
        return self.result.model if self.result is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The point as a JSON-ready row (what :meth:`SweepResult.table` lists)."""
        return {
            "budget": str(self.budget),
            "budget_ms": self.budget_ms,
            "feasible": self.feasible,
            "budget_met": self.budget_met,
            "dense_ms": self.dense_ms,
            "measured_ms": self.measured_ms,
            "ratio": self.ratio,
            "predicted_ms": self.predicted_ms,
            "importance_kept": self.importance_kept,
            "params": self.params,
            "macs": self.macs,
            "value": self.value,
            "min_latency_ms": self.min_latency_ms,
            "removed_blocks": len(self.result.plan.removed_blocks) if self.result else 0,
            "rounds": len(self.result.rounds) if self.result else 0,
            "limits_met": self.result.limits_met if self.result else None,
        }


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` produced: one point per budget (tightest first) and the dense model.

    ``timings`` holds the shared stages (``analyze_s``, ``importance_s``, ``tables_s``, …)
    once, each point's own in its ``result``.
    """

    points: tuple[SweepPoint, ...]
    dense: SweepPoint
    backend: str
    importance_method: str
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def table(self) -> list[dict[str, Any]]:
        """One row per point, the dense model first (JSON-ready)."""
        return [{"point": "dense", **self.dense.to_dict()}] + [
            {"point": f"budget {i}", **p.to_dict()} for i, p in enumerate(self.points)
        ]

    def to_dict(self) -> dict[str, Any]:
        """The whole sweep as ``sweep.json`` holds it."""
        return {
            "backend": self.backend,
            "importance_method": self.importance_method,
            "dense": self.dense.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "timings": self.timings,
        }

    def markdown(self) -> str:
        """The sweep as ``sweep.md`` holds it: one table row per point."""
        lines = [
            "# fxprune sweep",
            "",
            f"Backend: {self.backend}; importance: {self.importance_method}.",
            "",
            "| point | budget | feasible | measured ms | × dense | predicted ms | importance "
            "kept | params | MACs | value | met |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in self.table():
            value = "—" if row["value"] is None else f"{row['value']:.4g}"
            measured = (
                f"{row['measured_ms']:.3f}"
                if row["feasible"]
                else f"≥ {row['min_latency_ms']:.3f} (min)"
            )
            lines.append(
                f"| {row['point']} | {row['budget']} | {row['feasible']} | {measured} | "
                f"{row['ratio']:.3f} | {row['predicted_ms']:.3f} | {row['importance_kept']:.1%} "
                f"| {row['params']:,} | {row['macs']:,} | {value} | {row['budget_met']} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path) -> Path:
        """Write ``sweep.json``, ``sweep.md`` and, when matplotlib is installed, the plot
        ``sweep.png`` (latency ratio against importance kept and the evaluated value, the
        dense model marked); all or nothing, as :meth:`CompileResult.save`.

        The pruned models are not saved here: save a point's with ``point.result.save(dir)``.
        """
        from fxprune.core.io import replace_files, write_json, write_text

        def write(out: Path) -> None:
            write_json(out / "sweep.json", self.to_dict())
            write_text(out / "sweep.md", self.markdown())
            try:
                from fxprune.pipeline.plots import plot_frontier

                plot_frontier(self.table(), out / "sweep.png")
            except ImportError:  # matplotlib is optional
                pass

        return replace_files(directory, SWEEP_FILES, write)

    def __repr__(self) -> str:
        feasible = sum(p.feasible for p in self.points)
        return (
            f"SweepResult({len(self.points)} budgets, {feasible} feasible, dense "
            f"{self.dense.measured_ms:.3g} ms on {self.backend})"
        )


def sweep(
    model: nn.Module | torch.export.ExportedProgram,
    budgets: Iterable[float | str | Budget],
    *,
    example_inputs: ExampleInputs | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    max_batches: int | None = None,
    backend: str | Backend = "onnxruntime",
    config: CompileConfig | None = None,
) -> SweepResult:
    """Prune ``model`` to each of ``budgets`` on ``backend``: the latency / quality frontier.

    Args:
        model: the model (copied; never modified), or a ``torch.export.ExportedProgram``.
        budgets: latency budgets as :func:`fxprune.compile` takes them (``0.5``, ``"25ms"``,
            :class:`Budget`); solved and returned tightest first.
        example_inputs, data, loss_fn, max_batches, backend, config: as for
            :func:`fxprune.compile` (``config`` applies to every point, its ``max_params`` /
            ``max_macs`` / ``max_activation_bytes`` included).
        evaluate: called once on each feasible point's pruned model and once on a copy of the
            dense model, returning a quality figure (e.g. accuracy) recorded as the point's
            ``value``.

    Raises:
        ConfigError: no budgets, or a bad setting (before any work starts).
        InfeasibleLimit: a resource limit no plan meets (it holds for every budget).
    """
    config = config_from_keywords(config, {})
    parsed = [Budget.parse(b) for b in budgets]
    if not parsed:
        raise ConfigError("sweep(budgets=) must name at least one latency budget")
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ConfigError(
            f"sweep(max_batches=) must be an integer ≥ 1 or None, got {max_batches!r}"
        )
    start = time.perf_counter()
    be = get_backend(backend) if isinstance(backend, str) else backend
    run = _Run(config, be, parsed[0], _Log(config.progress), _further_backends(config))
    analysis = _analyse(run, model, example_inputs)
    priced = _tables(run, analysis, _importance_stage(run, analysis, data, loss_fn, max_batches))
    with run.log.stage("measure the dense model", run.timings, "dense_s"):
        (m_d,) = _measure(run, [analysis.gm], analysis)
    dense_ms = m_d.median_ms
    with run.log.stage("build problem", run.timings, "problem_s"):
        pp = priced.problem(config.allow_block_removal)
    read_cost = _read_prices(run)
    dense_fits = not run.also and all(_limits_met(run, analysis.gm).values())
    points: list[SweepPoint] = []
    previous = None  # the last feasible point's solved plan: the next solve starts from it
    for budget in sorted(parsed, key=lambda b: b.resolve(dense_ms)):
        point_run = replace(run, budget=budget, timings={})
        if dense_fits and dense_ms <= budget.resolve(dense_ms):
            result = _dense_result(point_run, analysis, dense_ms)
        else:
            run.log.say(f"sweep: budget {budget}")
            try:
                candidates, pp = _budget_loop(point_run, priced, pp, read_cost, start=previous)
            except InfeasibleBudget as exc:
                points.append(_infeasible_point(budget, exc, dense_ms))
                continue
            best = _choose(point_run, candidates)
            previous = best.solved
            norms = _norm_statistics(point_run, best.model, data, max_batches)
            result = _result(point_run, priced, pp, candidates, best, norms)
        value = float(evaluate(result.model)) if evaluate is not None else None
        points.append(_point(result, value))
    dense_value = float(evaluate(copy.deepcopy(analysis.gm))) if evaluate is not None else None
    run.timings["total_s"] = time.perf_counter() - start
    return SweepResult(
        points=tuple(points),
        dense=_dense_point(analysis, dense_ms, dense_value),
        backend=identity_label(be.identity()),
        importance_method=priced.importance.method,
        timings=dict(run.timings),
    )


def _point(result: CompileResult, value: float | None) -> SweepPoint:
    """A feasible point from its compile result."""
    return SweepPoint(
        budget=result.budget,
        budget_ms=result.budget_ms,
        feasible=True,
        budget_met=result.budget_met,
        dense_ms=result.dense_ms,
        measured_ms=result.measured_ms,
        ratio=result.measured_ms / result.dense_ms,
        predicted_ms=result.predicted_ms,
        importance_kept=result.importance_kept,
        params=result.params[1],
        macs=result.macs[1],
        value=value,
        result=result,
    )


def _infeasible_point(budget: Budget, exc: InfeasibleBudget, dense_ms: float) -> SweepPoint:
    """A point for a budget no plan meets: the smallest reachable latency, nothing else."""
    dense = exc.dense if exc.dense is not None else dense_ms
    return SweepPoint(
        budget=budget,
        budget_ms=budget.resolve(dense),
        feasible=False,
        budget_met=False,
        dense_ms=dense,
        measured_ms=math.nan,
        ratio=exc.min_latency / dense,
        predicted_ms=math.nan,
        importance_kept=math.nan,
        params=0,
        macs=0,
        min_latency_ms=exc.min_latency,
    )


def _dense_point(analysis: Any, dense_ms: float, value: float | None) -> SweepPoint:
    """The dense model as a point of the frontier (ratio 1, all importance kept)."""
    from fxprune.pipeline.report import count_macs, count_params

    return SweepPoint(
        budget=Budget.of_dense(1.0),
        budget_ms=dense_ms,
        feasible=True,
        budget_met=True,
        dense_ms=dense_ms,
        measured_ms=dense_ms,
        ratio=1.0,
        predicted_ms=dense_ms,
        importance_kept=1.0,
        params=count_params(analysis.gm),
        macs=count_macs(analysis.gm),
        value=value,
    )
