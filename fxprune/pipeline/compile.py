"""``fxprune.compile``: prune a model to a latency budget that holds when measured.

Stages (each timed in the result): trace and analyse → importance → latency tables on the
target runtime → build the problem → the budget loop (solve with SCIP → rewrite → measure) →
the result. The measured latency, not the prediction, decides: if the pruned model misses the
budget by more than ``tolerance``, the latency model is re-calibrated on what was just measured
(``a·Σ tables + p·live layers + b`` refitted on every pruned model measured so far and the
dense model, with a secant step once the budget is bracketed: :mod:`fxprune.pipeline.refit`)
and the problem re-solved; if it lands far under the budget the same refit loosens it. At most
``max_rounds`` rounds; the result keeps the most important plan that met the budget, and every
round's figures (:class:`~fxprune.pipeline.result.Round`).

Budgets: a float in ``(0, 1]`` is a fraction of the dense model's latency *measured side by side*
with the pruned one in the same round (runs alternate in short bursts, so host drift cancels); a
string with a unit (``"25ms"``, ``"0.025s"``, ``"800us"``) or :meth:`Budget.ms` is an absolute
time. A budget the dense model may already meet (``1.0``, or any absolute time) is checked first
with one measurement of the dense model; if it does, the result is that model unchanged
(``dense_meets_budget``): no tables, no solve, no rounds.

Settings come in one :class:`~fxprune.pipeline.config.CompileConfig`, validated before any
work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxprune.analysis import Analysis, analyze
from fxprune.analysis.importance import Importance, channel_importance, normalize_scores
from fxprune.analysis.trace import ExampleInputs
from fxprune.backends import (
    Backend,
    Measurement,
    get_backend,
    identity_label,
    measure_side_by_side,
    relative_latency,
)
from fxprune.core.errors import ConfigError
from fxprune.core.plan import Plan
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.tables import LatencyTables, annotate_latency
from fxprune.pipeline.config import CompileConfig, config_from_keywords
from fxprune.pipeline.problem import PruningProblem, build_problem, solution_from_plan
from fxprune.pipeline.refit import refit
from fxprune.pipeline.result import Budget, CompileResult, Round, RoundExport
from fxprune.rewrite.api import ExportSpec, prune
from fxprune.rewrite.prune import RewriteInfo, rewrite
from fxprune.solver import (
    InfeasibleBudget,
    InfeasibleLimit,
    Solution,
    solve_knapsack,
    solve_minlp,
    solve_uniform,
)
from fxprune.tuning.recalibrate import Recalibration, recalibrate_norms

__all__ = ["Budget", "CompileResult", "compile"]

logger = logging.getLogger("fxprune")


def compile(
    model: nn.Module | torch.export.ExportedProgram,
    latency_budget: float | str | Budget,
    *,
    example_inputs: ExampleInputs | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    backend: str | Backend = "onnxruntime",
    config: CompileConfig | None = None,
    **legacy: Any,
) -> CompileResult:
    """Prune ``model`` so that it runs within ``latency_budget`` on ``backend``.

    Args:
        model: the model (copied; never modified), or a ``torch.export.ExportedProgram``.
        latency_budget: ``0.5`` = half the dense latency; ``"25ms"`` = an absolute time.
        example_inputs: inputs at the deployment batch size and resolution: one tensor, one
            per positional argument, or a dict by argument name (optional arguments not
            given keep their defaults); None: an ExportedProgram's own example inputs.
            ``config.frontend`` says how the model is captured (fx, torch.export, or fx first
            and export if fx fails).
        data, loss_fn: batches ``(inputs, target)`` and ``loss_fn(output, target)`` for
            first-order Taylor importance; without them, L2 magnitude (the result says which).
        max_batches: batches of ``data`` used for importance (None: all).
        backend: ``"onnxruntime"`` (CUDA where present, else CPU), ``"torch"`` (eager),
            ``"inductor"`` (``torch.compile``), or a backend.
        config: every other setting (:class:`~fxprune.pipeline.config.CompileConfig`: solver,
            budget loop, coupling, latency tables, timing, cache, progress); None: defaults.
        legacy: the keyword arguments ``compile`` took before ``config`` (``solver=``,
            ``max_rounds=``, ``coupling=``, …): deprecated, translated by
            :func:`~fxprune.pipeline.config.config_from_keywords` (not together with
            ``config``).

    Raises:
        ConfigError: a bad setting (before any work starts); TypeError: an unknown keyword.
        InfeasibleBudget: with the smallest latency the model can reach, and the options that
            would let it go lower (only those that apply).
    """
    config = config_from_keywords(config, legacy)
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ConfigError(
            f"compile(max_batches=) must be an integer ≥ 1 or None, got {max_batches!r}"
        )
    budget = Budget.parse(latency_budget)
    be = get_backend(backend) if isinstance(backend, str) else backend
    run = _Run(config, be, budget, _Log(config.progress), _further_backends(config))
    analysis = _analyse(run, model, example_inputs)
    dense = _dense_check(run, analysis)
    if dense is not None:
        return dense
    priced = _tables(run, analysis, _importance(run, analysis, data, loss_fn, max_batches))
    with run.log.stage("build problem", run.timings, "problem_s"):
        pp = priced.problem(config.allow_block_removal)
    read_cost = _read_prices(run)
    candidates, pp = _budget_loop(run, priced, pp, read_cost)
    best = _choose(run, candidates)
    recalibration = _norm_statistics(run, best.model, data, max_batches)
    return _result(run, priced, pp, candidates, best, recalibration)


@dataclass
class _Run:
    """What every stage reads: the settings, the backend, the budget; timings and the log."""

    config: CompileConfig
    backend: Backend
    budget: Budget
    log: _Log
    #: further backends with their budgets (``CompileConfig.also``), by label
    also: dict[str, tuple[Backend, Budget]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _further_backends(config: CompileConfig) -> dict[str, tuple[Backend, Budget]]:
    """``config.also`` by label (the runtime's name, made unique), backends resolved."""
    out: dict[str, tuple[Backend, Budget]] = {}
    for backend, budget in config.also:
        be = get_backend(backend) if isinstance(backend, str) else backend
        label = str(be.identity().get("runtime", type(be).__name__))
        while label in out:
            label += "'"
        out[label] = (be, budget)
    return out


@dataclass
class _Priced:
    """The analysed model with its importance, latency tables and calibrated latency model."""

    analysis: Analysis
    importance: Importance
    tables: LatencyTables
    latency: LatencyModel
    min_keep: float = 0.0
    #: resource limits (``"params"`` / ``"macs"`` / ``"activation_bytes"`` → limit), each
    #: a solver row (activation bytes: one row per live set)
    limits: dict[str, int] = field(default_factory=dict)
    #: the latency models of ``CompileConfig.also``'s backends, by label (one row each)
    also: dict[str, LatencyModel] = field(default_factory=dict)

    def problem(self, blocks: bool) -> PruningProblem:
        """The pruning problem under the latency model as calibrated now."""
        return build_problem(
            self.analysis,
            self.latency,
            self.importance.scores,
            importance_method=self.importance.method,
            allow_block_removal=blocks,
            min_keep=self.min_keep,
            max_params=self.limits.get("params"),
            max_macs=self.limits.get("macs"),
            max_activation_bytes=self.limits.get("activation_bytes"),
            also=self.also,
        )


@dataclass(frozen=True)
class _Candidate:
    """One round's plan: what the solver chose, what was exported and what was measured."""

    #: the solved (constrained) plan: the latency model prices it and the refit learns from it
    solved: Plan
    #: the exported plan (unconstrained: lifted to per-consumer inputs, its ExportSpec noted)
    plan: Plan
    model: fx.GraphModule
    solution: Solution
    round: Round


def _analyse(
    run: _Run, model: nn.Module | torch.export.ExportedProgram, example_inputs: Any
) -> Analysis:
    """Capture the model (``config.frontend``) and find its channel groups and removable blocks."""
    with run.log.stage("trace and analyse", run.timings, "analyze_s"):
        return analyze(
            model,
            example_inputs,
            leaf_modules=run.config.leaf_modules,
            frontend=run.config.frontend,
            attention=run.config.attention,
        )


def _dense_check(run: _Run, analysis: Analysis) -> CompileResult | None:
    """The dense model as the result, if the budget is one it may meet and it does."""
    budget = run.budget
    if budget.fraction is not None and budget.fraction < 1:
        return None  # a fraction below 1 the dense model never meets
    if run.also:
        return None  # budgets on further backends: the loop measures the plan on each
    with run.log.stage("measure the dense model", run.timings, "dense_s"):
        (m_d,) = _measure(run, [analysis.gm], analysis)
    if m_d.median_ms <= budget.resolve(m_d.median_ms) and all(
        _limits_met(run, analysis.gm).values()
    ):
        return _dense_result(run, analysis, m_d.median_ms)
    return None


def _limits_met(run: _Run, model: fx.GraphModule) -> dict[str, bool]:
    """Per resource limit of the config, whether ``model`` (counted) keeps within it."""
    return {name: _count(name, model) <= limit for name, limit in run.config.limits().items()}


def _count(resource: str, model: fx.GraphModule) -> int:
    """A model's parameters, conv/linear MACs or peak activation bytes (as the result
    reports them)."""
    from fxprune.analysis.liveness import peak_activation_bytes
    from fxprune.pipeline.report import count_macs, count_params

    counter = {
        "params": count_params,
        "macs": count_macs,
        "activation_bytes": peak_activation_bytes,
    }[resource]
    return counter(model)


def _importance(
    run: _Run, analysis: Analysis, data: Any, loss_fn: Any, max_batches: int | None
) -> Importance:
    """Channel importance as ``config.objective`` says (Taylor with ``data`` by default, else
    L2 magnitude), normalised across groups as it says."""
    objective = run.config.objective
    with run.log.stage("importance", run.timings, "importance_s"):
        importance = channel_importance(
            analysis, data, loss_fn, max_batches=max_batches, method=objective.importance
        )
    return normalize_scores(importance, objective.normalize)


def _tables(run: _Run, analysis: Analysis, importance: Importance) -> _Priced:
    """Latency tables on the backend and the latency model built on them."""
    config = run.config
    also = {}
    with run.log.stage("latency tables", run.timings, "tables_s", spin=False):  # its own bar
        # the further backends' first: the target's tables annotate the nodes last
        for label, (backend, _) in run.also.items():
            also[label] = _latency_model(run, analysis, backend)
        latency = _latency_model(run, analysis, run.backend)
    tables = latency.tables
    if config.in_model_scales:
        from fxprune.latency.in_model import in_model_factors

        with run.log.stage("in-model layer scales", run.timings, "in_model_s"):
            latency.set_scales(in_model_factors(analysis, tables, run.backend))
    return _Priced(
        analysis, importance, tables, latency, config.objective.min_keep, config.limits(), also
    )


def _latency_model(run: _Run, analysis: Analysis, backend: Backend) -> LatencyModel:
    """Tables on ``backend`` and the latency model on them (calibrated on the dense model)."""
    config = run.config
    tables = annotate_latency(
        analysis, backend, cache=config.latency_cache(), config=config.tables_config()
    )
    return LatencyModel(
        analysis, tables, backend, measure_config=config.measure, sessions=config.loop.sessions
    )


def _read_prices(run: _Run) -> Any:
    """What unconstrained consumers' reads are priced by: timed (``measure``), probed
    (``auto``) or nothing (the other read policies, and constrained coupling)."""
    unconstrained = run.config.unconstrained
    if unconstrained is None:
        return None
    if unconstrained.reads == "measure":
        from fxprune.measure.reads import MeasuredReads

        return MeasuredReads(run.backend)
    if unconstrained.reads == "auto":
        from fxprune.measure.probes import measure_read_cost

        with run.log.stage("copy and MAC prices", run.timings, "probe_s"):
            return measure_read_cost(run.backend)
    return None


def _budget_loop(
    run: _Run, priced: _Priced, pp: PruningProblem, read_cost: Any, start: Plan | None = None
) -> tuple[list[_Candidate], PruningProblem]:
    """Solve, export and measure until a round meets the budget closely enough.

    ``start``: a solved plan the first round's solve is warm-started from (a sweep's previous,
    tighter budget: it meets this one too); later rounds start from their own last plan.
    Returns every round's candidate, and the problem as last calibrated.
    """
    loop, timings, log = run.config.loop, run.timings, run.log
    dense_ms = priced.tables.dense_ms
    budget_ms = run.budget.resolve(dense_ms)
    also_dense = {label: m.tables.dense_ms for label, m in priced.also.items()}
    candidates: list[_Candidate] = []
    fitted: list[_Candidate] = []  # the rounds the latency model is refitted on
    warm = solution_from_plan(pp, start) if start is not None else None
    timings.update(solve_s=0.0, rewrite_s=0.0, measure_s=0.0)
    for r in range(loop.max_rounds):
        target = budget_ms * (1 - loop.margin)
        also_budgets = {
            label: budget.resolve(also_dense[label]) for label, (_, budget) in run.also.items()
        }
        start = time.perf_counter()
        try:
            sol = _solve_round(run, priced, pp, r, target, budget_ms, dense_ms, warm, also_budgets)
        except InfeasibleBudget as exc:  # round 0 only: the tables' floor is measured first
            probe = _probe_floor(run, priced, pp, exc)
            if probe is None:
                raise
            pp, dense_ms = probe
            start += run.timings["floor_probe_s"]  # timed apart, not solve time
            budget_ms = run.budget.resolve(dense_ms)
            target = budget_ms * (1 - loop.margin)
            sol = _solve_round(run, priced, pp, r, target, budget_ms, dense_ms, warm, also_budgets)
        if sol is None:
            break
        timings["solve_s"] += time.perf_counter() - start
        start = time.perf_counter()
        solved = pp.plan(sol, _notes(priced.analysis, priced.importance.method, run))
        if any(_same_plan(c.solved, solved) for c in candidates):
            log.say(f"round {r}: the solver returned a plan already measured; stopping")
            break
        plan, pruned, export = _export(run, priced.analysis, pp, solved, read_cost)
        timings["rewrite_s"] += time.perf_counter() - start
        start = time.perf_counter()
        figures = _measure_round(run, pruned, priced.analysis, r)
        timings["measure_s"] += time.perf_counter() - start
        measured_ms, dense_ms, budget_ms = figures.measured_ms, figures.dense_ms, figures.budget_ms
        met = measured_ms <= budget_ms * (1 + loop.tolerance)
        also = _measure_also(run, priced, pruned, sol, also_budgets)
        also_dense = {label: v["dense_ms"] for label, v in also.items()}
        record = Round(
            round=r,
            target_ms=target,
            predicted_ms=sol.latency,
            measured_ms=measured_ms,
            measured_stable=figures.stable,
            dense_ms=dense_ms,
            budget_ms=budget_ms,
            met=met,
            importance_kept=sol.objective,
            removed_blocks=len(sol.removed),
            solver=sol.solver,
            status=sol.status,
            gap=sol.gap,
            solve_s=sol.time_s,
            export=export,
            also=also,
            measurements=figures.measurements,
        )
        candidates.append(_Candidate(solved, plan, pruned, sol, record))
        log.say(
            f"round {r}: predicted {sol.latency:.3f} ms, measured {measured_ms:.3f} ms "
            f"(budget {budget_ms:.3f} ms, dense {dense_ms:.3f} ms) → "
            f"{'met' if met else 'missed'}; importance kept {sol.objective:.1%}"
        )
        tight = measured_ms >= budget_ms * (1 - loop.slack) or any(
            v["measured_ms"] >= v["budget_ms"] * (1 - loop.slack) for v in also.values()
        )
        if record.all_met and tight:  # every budget met, the binding one closely
            break
        # the tables price the solved plan: an unconstrained export's extra cost (the union,
        # copies) is learnt by the refit like any other model error
        fitted.append(candidates[-1])
        if r + 1 < loop.max_rounds:  # refit on everything measured, dense at its latest figure
            points = [(c.solved, c.round.measured_ms, c.round.dense_ms) for c in fitted]
            refit(priced.latency, priced.analysis, points, dense_ms, budget_ms)
            for label, model in priced.also.items():
                points = [
                    (c.solved, c.round.also[label]["measured_ms"], c.round.also[label]["dense_ms"])
                    for c in fitted
                ]
                refit(model, priced.analysis, points, also_dense[label], also[label]["budget_ms"])
            pp = priced.problem(run.config.allow_block_removal)
            warm = solution_from_plan(pp, solved) if record.all_met else None
    return candidates, pp


@dataclass(frozen=True)
class _Figures:
    """A round's pruned and dense latencies (ms), measured side by side, and its budget."""

    measured_ms: float
    dense_ms: float
    budget_ms: float
    stable: bool
    measurements: int


def _measure_round(run: _Run, pruned: fx.GraphModule, analysis: Analysis, r: int) -> _Figures:
    """Round ``r``'s plan timed beside the dense model (``LoopConfig.confirm``: twice when the
    first figure lands over the budget but within the tolerance).

    The pruned figure is the paired ratio to the dense one times the dense figure: the host's
    drift between alternation rounds cancels out of it. A second measurement is averaged in
    ratio and dense figure alike, so a plan near the budget is judged on twice the runs.
    """
    loop = run.config.loop
    ratios: list[float] = []
    dense: list[float] = []
    stable = True
    while True:
        label = "measuring pruned and dense side by side" + (" again" if ratios else "")
        with run.log.spinner(f"round {r}: {label}"):
            m_p, m_d = _measure(run, [pruned, analysis.gm], analysis)
        ratios.append(relative_latency(m_p, m_d))
        dense.append(m_d.median_ms)
        stable = stable and m_p.stable
        dense_ms = sum(dense) / len(dense)
        measured_ms = sum(ratios) / len(ratios) * dense_ms
        budget_ms = run.budget.resolve(dense_ms)
        near = budget_ms < measured_ms <= budget_ms * (1 + loop.tolerance)
        if len(ratios) == 2 or not (loop.confirm and near):
            return _Figures(measured_ms, dense_ms, budget_ms, stable, len(ratios))
        run.log.say(
            f"round {r}: measured {measured_ms:.3f} ms, within the tolerance over the budget "
            f"{budget_ms:.3f} ms: measuring it again"
        )


def _same_plan(a: Plan, b: Plan) -> bool:
    """True when two plans keep the same channels and remove the same blocks."""
    return a.kept == b.kept and a.removed_blocks == b.removed_blocks and a.consumers == b.consumers


def _probe_floor(
    run: _Run, priced: _Priced, pp: PruningProblem, floor: InfeasibleBudget
) -> tuple[PruningProblem, float] | None:
    """Measure the plan at the tables' floor beside the dense model and refit on it.

    Before any round is measured, the latency model's constant is one dense figure minus the
    units' sum at full width. The units and that figure are timed minutes apart, so a change
    of load on the host in between moves the constant, and the floor with it: a budget the
    model can meet would be refused. One rewrite and one side-by-side measurement of the
    fastest plan settle it on two measured points (that plan and the dense model). Returns the
    refitted problem and the dense figure measured beside the plan; None when the solver does
    not return the floor's plan (the tables' word stands then).
    """
    analysis, log, solve = priced.analysis, run.log, run.config.solve
    opts = {"time_limit": solve.time_limit, "gap": solve.gap}
    try:
        fastest = _solve(solve.solver, pp, floor.min_latency * (1 + 1e-6), None, opts)
    except (InfeasibleBudget, InfeasibleLimit):
        return None
    plan = pp.plan(fastest, _notes(analysis, priced.importance.method, run))
    log.say(
        f"the tables put the smallest latency at {floor.min_latency:.3f} ms, over the budget "
        f"{floor.budget:.3f} ms: measuring that plan before refusing the budget"
    )
    start = time.perf_counter()
    with log.spinner("measuring the fastest plan and the dense model side by side"):
        m_p, m_d = _measure(run, [prune(analysis, plan), analysis.gm], analysis)
    run.timings["floor_probe_s"] = time.perf_counter() - start
    dense_ms = m_d.median_ms
    measured = relative_latency(m_p, m_d) * dense_ms
    log.say(f"the fastest plan measured {measured:.3f} ms (dense {dense_ms:.3f} ms)")
    refit(priced.latency, analysis, [(plan, measured, dense_ms)], dense_ms)
    return priced.problem(run.config.allow_block_removal), dense_ms


def _solve_round(
    run: _Run,
    priced: _Priced,
    pp: PruningProblem,
    r: int,
    target: float,
    budget_ms: float,
    dense_ms: float,
    warm: Solution | None,
    also_budgets: dict[str, float] | None = None,
) -> Solution | None:
    """Round ``r``'s solution for ``target`` ms (and each further backend's budget, less the
    loop's margin, as its row's limit). In round 0, a target out of reach is retried at the
    budget itself (the minimum may lie between them), on every backend. In a later round a
    latency target out of reach gives the fastest plan instead (the refitted floor is a guess
    until that plan is measured); None when a further backend's budget is out of reach then
    (the loop stops with what it has).

    Raises:
        InfeasibleBudget: in the first round, when not even the budget itself is reachable.
        InfeasibleLimit: in the first round, when a further backend's budget is out of reach
            (or any resource limit).
    """
    solve = run.config.solve
    opts = {"time_limit": solve.time_limit, "gap": solve.gap}

    def at(also_limits: dict[str, float]) -> Solution | None:
        limited = _with_also(pp, also_limits)
        try:
            return _solve(solve.solver, limited, target, warm, opts)
        except InfeasibleBudget as exc:
            if r > 0:  # the refit may misjudge the floor: measure the fastest plan instead
                run.log.say(
                    f"round {r}: the re-calibrated target {target:.3f} ms is out of reach "
                    f"(floor {exc.min_latency:.3f} ms predicted): measuring the fastest plan"
                )
                try:
                    return _solve(solve.solver, limited, exc.min_latency * (1 + 1e-6), None, opts)
                except (InfeasibleBudget, InfeasibleLimit):
                    return None
            try:  # the minimum may lie between the target and the budget: try the budget
                if not exc.min_latency <= budget_ms:  # (also catches NaN)
                    raise
                return _solve(solve.solver, limited, budget_ms, warm, opts)
            except InfeasibleBudget as again:
                allow = run.config.allow_block_removal
                raise InfeasibleBudget(
                    budget_ms,
                    again.min_latency,
                    dense_ms,
                    block_removal=_block_removal_hint(pp, solve.solver, allow, priced.problem),
                    layout_block=_layout_floor_hint(priced.analysis, priced.tables),
                    limits=again.limits,
                ) from None

    also_budgets = also_budgets or {}
    margin = 1 - run.config.loop.margin
    try:
        return at({label: ms * margin for label, ms in also_budgets.items()})
    except InfeasibleLimit as exc:
        if not exc.resource.startswith("latency@"):
            raise
    try:
        return at(also_budgets)
    except InfeasibleLimit as exc:
        if r == 0 or not exc.resource.startswith("latency@"):
            raise
        run.log.say(f"round {r}: the budget on {exc.resource} is out of reach re-calibrated")
        return None


def _with_also(pp: PruningProblem, limits: dict[str, float]) -> PruningProblem:
    """``pp`` with each further backend's latency row limited to ``limits[label]`` ms."""
    if not limits:
        return pp
    resources = tuple(
        dataclasses.replace(r, limit=limits[r.name.removeprefix("latency@")])
        if r.name.startswith("latency@")
        else r
        for r in pp.problem.resources
    )
    return dataclasses.replace(pp, problem=dataclasses.replace(pp.problem, resources=resources))


def _measure_also(
    run: _Run,
    priced: _Priced,
    pruned: fx.GraphModule,
    sol: Solution,
    budgets: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """The pruned model measured on each further backend, side by side with the dense model
    there: per label its budget, the row's prediction, the figures and whether it was met."""
    config, out = run.config, {}
    for label, (backend, budget) in run.also.items():
        with run.log.spinner(f"measuring pruned and dense side by side on {label}"):
            m_p, m_d = measure_side_by_side(
                backend,
                [pruned, priced.analysis.gm],
                priced.analysis.example_inputs,
                config.measure,
                config.loop.sessions,
            )
        measured = relative_latency(m_p, m_d) * m_d.median_ms
        budget_ms = budget.resolve(m_d.median_ms)
        out[label] = {
            "target_ms": budgets[label] * (1 - config.loop.margin),
            "predicted_ms": float(sol.resources.get(f"latency@{label}", float("nan"))),
            "measured_ms": measured,
            "dense_ms": m_d.median_ms,
            "budget_ms": budget_ms,
            "met": measured <= budget_ms * (1 + config.loop.tolerance),
        }
        run.log.say(
            f"  on {label}: predicted {out[label]['predicted_ms']:.3f} ms, measured "
            f"{measured:.3f} ms (budget {budget_ms:.3f} ms) → "
            f"{'met' if out[label]['met'] else 'missed'}"
        )
    return out


def _solve(
    name: str, pp: PruningProblem, target: float, warm: Solution | None, opts: dict
) -> Solution:
    if name == "minlp":
        return solve_minlp(pp.problem, target, warm_start=warm, **opts)
    if name == "knapsack":
        return solve_knapsack(pp.problem, target, time_limit=opts.get("time_limit", 30.0))
    return solve_uniform(pp.problem, target)


def _export(
    run: _Run, analysis: Analysis, pp: PruningProblem, solved: Plan, read_cost: Any
) -> tuple[Plan, fx.GraphModule, RoundExport | None]:
    """The pruned model for a solved plan: the plan it exports, the model, how (unconstrained).

    Constrained: the solved plan, rewritten. Unconstrained: each consumer keeps its own best
    inputs (:func:`~fxprune.unconstrained.masks.consumer_choice`), the reads are chosen by the
    read policy, and the export taken is recorded in the plan (:class:`ExportSpec`) so that
    ``rebuild`` reproduces this exact structure.
    """
    unconstrained = run.config.unconstrained
    if unconstrained is None:
        return solved, prune(analysis, solved), None
    from fxprune.unconstrained.masks import consumer_choice

    allowed = {g.name: g.counts for g in pp.problem.groups}  # the tables' candidates
    plan = consumer_choice(analysis, solved, align=allowed)
    if unconstrained.reads == "measure":
        from fxprune.measure.export_choice import measured_rewrite

        pruned, info, choice = measured_rewrite(analysis, plan, read_cost)
    else:
        pruned, info = rewrite(analysis, plan, reads=unconstrained.reads, read_cost=read_cost)
        choice = None
    plan = ExportSpec.from_info(info).recorded_in(plan)
    return plan, pruned, _round_export(pruned, info, choice, unconstrained.reads)


def _round_export(
    pruned: fx.GraphModule, info: RewriteInfo, choice: Any, reads: str
) -> RoundExport:
    """How an unconstrained round was exported: the reads kept, their copies, the segments.

    ``kept`` is what the whole-model check chose with ``reads="measure"``, else the read policy
    itself; ``runoff`` the second look at a close call, if there was one.
    """
    from fxprune.rewrite.prune import channel_copies

    gathers, slices = channel_copies(pruned)
    check = choice.to_dict() if choice is not None else {}
    return RoundExport(
        kept=check.get("kept", reads),
        gathers=gathers,
        slices=slices,
        vs_exact=check.get("vs_exact", {}),
        runoff=check.get("runoff"),
        segments=info.segments.segments if info.segments is not None else 0,
        choice=choice,
    )


def _measure(run: _Run, models: list[fx.GraphModule], analysis: Analysis) -> list[Measurement]:
    """``models`` timed side by side on the backend, as the config says."""
    config = run.config
    return measure_side_by_side(
        run.backend, models, analysis.example_inputs, config.measure, config.loop.sessions
    )


def _choose(run: _Run, candidates: list[_Candidate]) -> _Candidate:
    """The most important plan that met the budget (and every resource limit, counted on the
    pruned model); else, with a warning, the closest."""
    met = [c for c in candidates if c.round.all_met and all(_limits_met(run, c.model).values())]
    if met:
        return max(met, key=lambda c: c.solution.objective)
    best = min(candidates, key=lambda c: c.round.measured_over_budget)
    limits = ", ".join(
        [f"max_{k}={v}" for k, v in run.config.limits().items()]
        + [f"{budget} on {label}" for label, (_, budget) in run.also.items()]
    )
    warnings.warn(
        f"fxprune.compile: no round met the budget {run.budget}"
        f"{f' (with {limits}, counted on the pruned model)' if limits else ''} within "
        f"{run.config.loop.tolerance:.0%} after {len(candidates)} rounds (closest: "
        f"{best.round.measured_over_budget:.3f}× budget). Returning the closest plan; raise "
        "max_rounds or the budget.",
        RuntimeWarning,
        stacklevel=3,  # compile's caller
    )
    return best


def _norm_statistics(
    run: _Run, model: fx.GraphModule, data: Any, max_batches: int | None
) -> Recalibration | None:
    """The pruned model's BatchNorm statistics re-estimated on ``data`` (when given)."""
    if data is None or not run.config.recalibrate:
        return None
    with run.log.stage("recalibrate norms", run.timings, "recalibrate_s"):
        done = recalibrate_norms(model, data, max_batches=max_batches)
    logger.info("re-estimated %d norm layers on %d batches", done.modules, done.batches)
    return done


def _result(
    run: _Run,
    priced: _Priced,
    pp: PruningProblem,
    candidates: list[_Candidate],
    best: _Candidate,
    recalibration: Recalibration | None = None,
) -> CompileResult:
    """The chosen candidate with the evidence: its round's figures and every round's."""
    from fxprune.pipeline.report import count_macs, count_params

    analysis, sol, record = priced.analysis, best.solution, best.round
    return CompileResult(
        model=best.model,
        plan=best.plan,
        analysis=analysis,
        budget=run.budget,
        budget_ms=record.budget_ms,
        dense_ms=record.dense_ms,
        predicted_ms=record.predicted_ms,
        measured_ms=record.measured_ms,
        budget_met=bool(record.met),
        # unconstrained: the solved plan's share (each consumer then keeps its own best inputs,
        # so this is a lower bound; the group-level union would overstate it)
        importance_kept=pp.importance_kept(best.solved),
        importance_method=priced.importance.method,
        solver={
            "name": sol.solver,
            "status": sol.status,
            "gap": sol.gap,
            "objective": sol.objective,
            "time_s": sol.time_s,
            "variables_groups": len(pp.problem.groups),
            "ops": len(pp.problem.ops),
            "removable_blocks": len(pp.problem.blocks),
        },
        rounds=[c.round for c in candidates],
        timings={**run.timings, "total_s": sum(run.timings.values())},
        backend=identity_label(run.backend.identity()),
        params=(count_params(analysis.gm), count_params(best.model)),
        macs=(count_macs(analysis.gm), count_macs(best.model)),  # the rewrite refreshed shapes
        tables=priced.tables,
        recalibration=recalibration,
        limits={
            name: {
                "limit": limit,
                "predicted": float(sol.resources.get(name, float("nan"))),
                "measured": _count(name, best.model),
                "met": _count(name, best.model) <= limit,
            }
            for name, limit in run.config.limits().items()
        }
        | {  # each further backend's budget, as measured there
            f"latency@{label}": {
                "limit": v["budget_ms"],
                "predicted": v["predicted_ms"],
                "measured": v["measured_ms"],
                "met": v["met"],
            }
            for label, v in record.also.items()
        },
    )


def _block_removal_hint(
    pp: PruningProblem,
    solver: str,
    allow_block_removal: bool,
    problem: Callable[[bool], PruningProblem],
) -> tuple[str, ...]:
    """What would let residual blocks go, if the model has removable ones not offered."""
    offered = pp if allow_block_removal else problem(True)
    if not offered.problem.blocks:
        return ()  # no block the solver could remove
    needs = () if solver == "minlp" else ("solver",)  # the baselines prune channels only
    return needs + (() if allow_block_removal else ("allow_block_removal",))


def _layout_floor_hint(analysis: Analysis, tables: LatencyTables) -> int:
    """The runtime's layout block when it kept smaller counts out of some group's grid, else 1."""
    block = int(tables.notes.get("layout_block", 1))
    floored = any(
        min(grid) >= block and analysis.group(name).size > block
        for name, grid in tables.group_grids.items()
        if grid
    )
    return block if block > 1 and floored else 1


def _dense_result(run: _Run, analysis: Analysis, dense_ms: float) -> CompileResult:
    """The dense model, unchanged, for a budget it already meets (measured once, nothing solved)."""
    from fxprune.pipeline.report import count_macs, count_params

    budget, timings = run.budget, run.timings
    budget_ms = budget.resolve(dense_ms)
    note = (
        f"the dense model already meets the budget ({dense_ms:.4g} ms ≤ {budget_ms:.4g} ms): "
        "nothing pruned"
    )
    run.log.say(note)
    plan = Plan(
        {},
        (),
        analysis.signature,
        {
            "strategy": "compile/dense",
            "budget": str(budget),
            "note": note,
            "input_shapes": [list(t.shape) for t in analysis.example_inputs],
        },
    )
    params, macs = count_params(analysis.gm), count_macs(analysis.gm)
    return CompileResult(
        model=prune(analysis, plan),  # a copy: the result never aliases the analysed graph
        plan=plan,
        analysis=analysis,
        budget=budget,
        budget_ms=budget_ms,
        dense_ms=dense_ms,
        predicted_ms=dense_ms,
        measured_ms=dense_ms,
        budget_met=True,
        importance_kept=1.0,
        importance_method="none",
        solver={"name": "none", "status": note},
        rounds=[],
        timings={**timings, "total_s": sum(timings.values())},
        backend=identity_label(run.backend.identity()),
        params=(params, params),
        macs=(macs, macs),
        dense_meets_budget=True,
        limits={
            name: {"limit": limit, "predicted": count, "measured": count, "met": True}
            for name, limit in run.config.limits().items()
            for count in [_count(name, analysis.gm)]
        },
    )


def _notes(analysis: Analysis, method: str, run: _Run) -> dict[str, Any]:
    """The notes every solved plan carries: how it was made, for which budget and inputs."""
    return {
        "strategy": f"compile/{run.config.solve.solver}",
        "budget": str(run.budget),
        "importance": method,
        "input_shapes": [list(t.shape) for t in analysis.example_inputs],
        "frontend": analysis.frontend,
        "attention": analysis.attention,
    }


class _Log:
    """Stage timing and messages through :mod:`logging` (logger ``fxprune``; the CLI shows
    them with rich). With ``progress`` off, nothing is logged."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def say(self, text: str) -> None:
        if self.enabled:
            logger.info(text)

    @contextlib.contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        self.say(f"{text} …")
        yield

    @contextlib.contextmanager
    def stage(
        self, text: str, timings: dict[str, float], key: str, spin: bool = True
    ) -> Iterator[None]:
        start = time.perf_counter()
        with self.spinner(text) if spin else contextlib.nullcontext():
            yield
        timings[key] = time.perf_counter() - start
        self.say(f"{text}: {timings[key]:.1f} s")
