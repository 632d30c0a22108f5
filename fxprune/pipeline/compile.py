"""``fxprune.compile``: prune a model to a latency budget that holds when measured.

Stages (each timed in the result): trace and analyse → importance → latency tables on the
target runtime → build the problem → solve (SCIP) → rewrite → measure. The measured latency,
not the prediction, decides: if the pruned model misses the budget by more than ``tolerance``,
the latency model is re-calibrated on what was just measured (``a·Σ tables + b`` refitted on
every pruned model measured so far and the dense model) and the problem re-solved; if it lands
far under the budget the same refit loosens it. At most ``max_rounds`` rounds; the result keeps
the most important plan that met the budget, and every round's figures.

Budgets: a float in ``(0, 1]`` is a fraction of the dense model's latency *measured side by side*
with the pruned one in the same round (runs alternate in short bursts, so host drift cancels); a string with
a unit (``"25ms"``, ``"0.025s"``, ``"800us"``) or :meth:`Budget.ms` is an absolute time. A
budget the dense model may already meet (``1.0``, or any absolute time) is checked first with one
measurement of the dense model; if it does, the result is that model unchanged
(``dense_meets_budget``): no tables, no solve, no rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxprune.analysis import Analysis, analyze
from fxprune.analysis.importance import channel_importance
from fxprune.analysis.trace import as_input_tuple
from fxprune.backends import (
    Backend,
    LatencyCache,
    MeasureConfig,
    get_backend,
    identity_label,
    measure_side_by_side,
    relative_latency,
)
from fxprune.core.plan import Plan
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.tables import LatencyConfig, LatencyTables, annotate_latency
from fxprune.pipeline.problem import PruningProblem, build_problem, solution_from_plan
from fxprune.rewrite.api import prune
from fxprune.rewrite.prune import rewrite
from fxprune.solver import (
    InfeasibleBudget,
    Solution,
    solve_knapsack,
    solve_minlp,
    solve_uniform,
)

__all__ = ["Budget", "CompileResult", "compile"]

logger = logging.getLogger("fxprune")

_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


@dataclass(frozen=True)
class Budget:
    """A latency budget: a fraction of the dense model's latency, or an absolute time (ms)."""

    fraction: float | None = None
    ms_: float | None = None

    @classmethod
    def of_dense(cls, fraction: float) -> Budget:
        return cls(fraction=fraction)

    @classmethod
    def ms(cls, value: float) -> Budget:
        return cls(ms_=value)

    @classmethod
    def parse(cls, budget: float | str | Budget) -> Budget:
        """``0.5`` / ``"0.5"`` / ``"0.5x"`` → half the dense latency; ``"25ms"``, ``"0.025s"``,
        ``"800us"`` → an absolute time."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(s|ms|us|µs|x)?\s*", budget)
            if m is None:
                raise ValueError(
                    f"latency budget {budget!r}: give a time with a unit ('25ms', '0.025s', "
                    "'800us') or a fraction of the dense latency (0.5, '0.5' or '0.5x')"
                )
            if m.group(2) in (None, "x"):
                return cls.parse(float(m.group(1)))
            return cls(ms_=float(m.group(1)) * _UNITS[m.group(2)])
        value = float(budget)
        if not 0 < value <= 1:
            raise ValueError(
                f"latency budget {value}: a number is a fraction of the dense model's latency and "
                "must be in (0, 1]; for an absolute time pass a string with a unit, e.g. '25ms'"
            )
        return cls(fraction=value)

    def resolve(self, dense_ms: float) -> float:
        """The budget in ms given the dense model's latency."""
        return self.fraction * dense_ms if self.fraction is not None else float(self.ms_)

    def __str__(self) -> str:
        return f"{self.fraction:g}× dense" if self.fraction is not None else f"{self.ms_:g} ms"


@dataclass(repr=False)
class CompileResult:
    """What :func:`compile` produced, and the evidence that it meets the budget.

    ``model`` is the pruned GraphModule. Latencies are in ms on ``backend``; ``dense_ms`` and
    ``measured_ms`` were measured side by side in the chosen round; ``predicted_ms`` is the
    calibrated latency model's figure for the plan. ``importance_kept`` is the fraction of the
    prunable groups' total importance the plan keeps (``importance_method`` says which scores).
    """

    model: fx.GraphModule
    plan: Plan
    analysis: Analysis
    budget: Budget
    budget_ms: float
    dense_ms: float
    predicted_ms: float
    measured_ms: float
    budget_met: bool
    importance_kept: float
    importance_method: str
    solver: dict[str, Any]
    rounds: list[dict[str, Any]]
    timings: dict[str, float]
    backend: str
    params: tuple[int, int] = (0, 0)
    macs: tuple[int, int] = (0, 0)
    tables: LatencyTables | None = field(default=None, repr=False)
    #: the budget was already met by the dense model: ``model`` is it, unchanged, measured once
    dense_meets_budget: bool = False

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.measured_ms

    def summary(self) -> dict[str, Any]:
        """The headline figures, JSON-ready."""
        return {
            "budget": str(self.budget),
            "budget_ms": self.budget_ms,
            "dense_ms": self.dense_ms,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_over_budget": self.measured_ms / self.budget_ms,
            "budget_met": self.budget_met,
            "dense_meets_budget": self.dense_meets_budget,
            "speedup": self.speedup,
            "importance_kept": self.importance_kept,
            "importance_method": self.importance_method,
            "removed_blocks": len(self.plan.removed_blocks),
            "coupling": self.plan.notes.get("coupling", "constrained"),
            "params_before": self.params[0],
            "params_after": self.params[1],
            "macs_before": self.macs[0],
            "macs_after": self.macs[1],
            "rounds": len(self.rounds),
            "backend": self.backend,
        }

    def report(self) -> dict[str, Any]:
        """The analysis report of the plan plus the compile section (JSON-ready)."""
        from fxprune.pipeline.report import analysis_report

        report = analysis_report(self.analysis, self.plan, self.model)
        report["summary"].update(self.summary())
        report["solver"] = self.solver
        report["rounds"] = self.rounds
        report["timings"] = self.timings
        return report

    def save(self, directory: str | Path, *, onnx: bool = True, dynamic_batch: bool = True) -> Path:
        """Write the result so it can be inspected, rebuilt and deployed; all or nothing.

        Files: ``plan.json``; ``pruned_state_dict.pt`` (with the original architecture and the
        plan, :func:`fxprune.rebuild` re-creates the model — no pickled code needed);
        ``pruned_model.pt`` (the GraphModule pickled: ``torch.load(path, weights_only=False)``
        wherever torch and the model's own module classes import); ``pruned.onnx`` (checked
        against ONNX Runtime; its batch axis is dynamic unless ``dynamic_batch=False``);
        ``report.md`` / ``report.json``; ``widths.png`` when matplotlib is installed.

        Everything is written beside ``directory`` first and moved in only when all of it
        succeeded, so a failure (e.g. the ONNX check) leaves ``directory`` as it was. Files
        there that are not among these names are kept; these names that this save does not
        write (``pruned.onnx`` with ``onnx=False``) are removed, so no file of an earlier run
        stays beside the new ones.
        """
        from fxprune.backends.export import export_onnx
        from fxprune.core.io import replace_files, write_json, write_text
        from fxprune.pipeline.report import render_markdown

        def write(out: Path) -> None:
            if onnx:  # the likeliest failure: first
                example = self.analysis.example_inputs
                export_onnx(self.model, out / "pruned.onnx", example, dynamic_batch=dynamic_batch)
            self.plan.save(out / "plan.json")
            torch.save(self.model.state_dict(), out / "pruned_state_dict.pt")
            torch.save(self.model, out / "pruned_model.pt")
            report = self.report()
            write_json(out / "report.json", report)
            write_text(out / "report.md", render_markdown(report) + _rounds_markdown(self.rounds))
            try:
                from fxprune.pipeline.plots import plot_widths

                plot_widths(self.analysis, self.plan, out / "widths.png")
            except ImportError:  # matplotlib is optional
                pass

        return replace_files(directory, SAVED_FILES, write)

    def __repr__(self) -> str:
        """One line: budget, latencies, what was pruned, where (the model is in ``.model``)."""
        return (
            f"CompileResult(budget {self.budget} = {self.budget_ms:.3g} ms, "
            f"{'met' if self.budget_met else 'missed'}: measured {self.measured_ms:.3g} ms, "
            f"dense {self.dense_ms:.3g} ms, predicted {self.predicted_ms:.3g} ms, "
            f"speedup {self.speedup:.2f}x; {len(self.plan.kept)} groups pruned, "
            f"{len(self.plan.removed_blocks)} blocks removed, importance kept "
            f"{self.importance_kept:.1%}; {len(self.rounds)} rounds on {self.backend})"
        )


#: The files :meth:`CompileResult.save` writes (and replaces, and removes when it does not).
SAVED_FILES = (
    "plan.json",
    "pruned_state_dict.pt",
    "pruned_model.pt",
    "pruned.onnx",
    "report.json",
    "report.md",
    "widths.png",
)


def _rounds_markdown(rounds: Sequence[dict[str, Any]]) -> str:
    export = any("export" in r for r in rounds)
    lines = ["", "## Budget rounds", ""]
    head = "| round | target ms | predicted ms | measured ms | dense ms | budget ms | met |"
    lines += [head + (" export (gathers, slices) |" if export else "")]
    lines += ["|---:|---:|---:|---:|---:|---:|---|" + ("---|" if export else "")]
    for r in rounds:
        row = (
            f"| {r['round']} | {r['target_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{r['measured_ms']:.3f} | {r['dense_ms']:.3f} | {r['budget_ms']:.3f} | {r['met']} |"
        )
        if export:
            e = r.get("export", {})
            row += f" {e.get('kept', '—')} ({e.get('gathers', 0)}, {e.get('slices', 0)}) |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _export_record(pruned: fx.GraphModule, info: Any, choice: Any, reads: str) -> dict[str, Any]:
    """How an unconstrained round was exported: the reads kept, their copies, the segments.

    ``kept`` is what the whole-model check chose (exact / measured / segmented / lean /
    aligned / aligned_lean) with ``reads="measure"``, else the read policy itself; ``runoff``
    the second look at a close call, if there was one.
    """
    from fxprune.rewrite.prune import channel_copies

    gathers, slices = channel_copies(pruned)
    check = choice.to_dict() if choice is not None else {}
    out = {"kept": check.get("kept", reads), "gathers": gathers, "slices": slices}
    out["vs_exact"] = check.get("vs_exact", {})
    if check.get("runoff"):
        out["runoff"] = check["runoff"]
    out["segments"] = info.segments.segments if info.segments is not None else 0
    return out


_SOLVERS = ("minlp", "knapsack", "uniform")


def _solve(
    name: str, pp: PruningProblem, target: float, warm: Solution | None, opts: dict
) -> Solution:
    if name == "minlp":
        return solve_minlp(pp.problem, target, warm_start=warm, **opts)
    if name == "knapsack":
        return solve_knapsack(pp.problem, target, time_limit=opts.get("time_limit", 30.0))
    return solve_uniform(pp.problem, target)


def compile(
    model: nn.Module,
    latency_budget: float | str | Budget,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    backend: str | Backend = "onnxruntime",
    cache: LatencyCache | str | Path | None = None,
    solver: str = "minlp",
    time_limit: float = 30.0,
    gap: float = 1e-3,
    tolerance: float = 0.02,
    margin: float = 0.02,
    slack: float = 0.05,
    max_rounds: int = 4,
    allow_block_removal: bool = True,
    in_model_scales: bool = False,
    latency_config: LatencyConfig | None = None,
    measure_config: MeasureConfig | None = None,
    sessions: int = 1,
    leaf_modules: Iterable[type | str] | None = None,
    coupling: str = "constrained",
    reads: str = "measure",
    progress: bool = True,
) -> CompileResult:
    """Prune ``model`` so that it runs within ``latency_budget`` on ``backend``.

    Args:
        model: the model (copied; never modified).
        latency_budget: ``0.5`` = half the dense latency; ``"25ms"`` = an absolute time.
        example_inputs: inputs at the deployment batch size and resolution.
        data, loss_fn: batches ``(inputs, target)`` and ``loss_fn(output, target)`` for
            first-order Taylor importance; without them, L2 magnitude (the result says which).
        backend: ``"onnxruntime"`` (CUDA where present, else CPU), ``"torch"``, or a backend.
        cache: latency cache (a :class:`LatencyCache` or a directory); default location else.
        solver: ``"minlp"`` (exact, SCIP), or the baselines ``"knapsack"`` / ``"uniform"``.
        time_limit, gap: SCIP's time limit (s) and relative gap.
        tolerance: a measured latency up to ``budget·(1 + tolerance)`` meets the budget.
        margin: the solver aims at ``budget·(1 − margin)`` to leave room for noise.
        slack: a plan measured under ``budget·(1 − slack)`` is loosened in a further round.
        max_rounds: solve–measure rounds at most.
        allow_block_removal: let the solver remove residual blocks (MDP); else channels only.
        in_model_scales: scale each layer's table to its kernel time inside the profiled dense
            model (:mod:`fxprune.latency.in_model`; ONNX Runtime only).
        latency_config: how tables are built (grid, sweeps, timing).
        measure_config, sessions: how whole models are timed (per session, and sessions).
        leaf_modules: module classes or names to keep opaque (their channels freeze).
        coupling: ``"constrained"`` (coupled tensors keep the same channels) or
            ``"unconstrained"`` (UCPE: each conv/linear keeps as many inputs as the solved plan
            gives it, but its own best ones; shared tensors keep the union, channels are
            reordered, and the budget is met by the measured exported model, copies included).
        reads: how unconstrained consumers read their inputs: ``"measure"`` (time each
            consumer's slice / gather / zero-padded candidates on the backend, keep the
            fastest), ``"auto"`` (one probed copy and MAC price), ``"exact"``, ``"full"``; see
            :mod:`fxprune.unconstrained.reads`.
        progress: rich progress output.

    Raises:
        InfeasibleBudget: with the smallest latency the model can reach, and the options that
            would let it go lower (only those that apply).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {solver!r}")
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    if coupling not in ("constrained", "unconstrained"):
        raise ValueError(f"coupling must be 'constrained' or 'unconstrained', got {coupling!r}")
    budget = Budget.parse(latency_budget)
    be = get_backend(backend) if isinstance(backend, str) else backend
    if cache is not None and not isinstance(cache, LatencyCache):
        cache = LatencyCache(cache)
    inputs = as_input_tuple(example_inputs)
    measure_config = measure_config or MeasureConfig(warmup=5, repeats=30, min_seconds=1.5)
    latency_config = latency_config or LatencyConfig(progress=progress)
    log = _Log(progress)
    timings: dict[str, float] = {}

    with log.stage("trace and analyse", timings, "analyze_s"):
        analysis = analyze(model, inputs, leaf_modules=leaf_modules)
    if budget.fraction is None or budget.fraction >= 1:  # a budget the dense model may meet
        with log.stage("measure the dense model", timings, "dense_s"):
            (m_d,) = measure_side_by_side(
                be, [analysis.gm], analysis.example_inputs, measure_config, sessions
            )
        if m_d.median_ms <= budget.resolve(m_d.median_ms):
            return _dense_result(analysis, budget, m_d.median_ms, be, timings, log)
    with log.stage("importance", timings, "importance_s"):
        importance = channel_importance(analysis, data, loss_fn, max_batches=max_batches)
    with log.stage("latency tables", timings, "tables_s", spin=False):  # has its own bar
        tables = annotate_latency(analysis, be, cache=cache, config=latency_config)
    latency = LatencyModel(analysis, tables, be, measure_config=measure_config, sessions=sessions)
    if in_model_scales:
        from fxprune.latency.in_model import in_model_factors

        with log.stage("in-model layer scales", timings, "in_model_s"):
            latency.set_scales(in_model_factors(analysis, tables, be))

    def problem(blocks: bool = allow_block_removal) -> PruningProblem:
        return build_problem(
            analysis,
            latency,
            importance.scores,
            importance_method=importance.method,
            allow_block_removal=blocks,
        )

    with log.stage("build problem", timings, "problem_s"):
        pp = problem()
    rewrite_options: dict[str, Any] = {}
    if coupling == "unconstrained":
        rewrite_options["reads"] = reads
        if reads == "measure":
            from fxprune.measure.reads import MeasuredReads

            rewrite_options["read_cost"] = MeasuredReads(be)
        elif reads == "auto":
            from fxprune.measure.probes import measure_read_cost

            with log.stage("copy and MAC prices", timings, "probe_s"):
                rewrite_options["read_cost"] = measure_read_cost(be)
    opts = {"time_limit": time_limit, "gap": gap}
    budget_ms = budget.resolve(tables.dense_ms)
    dense_ms = tables.dense_ms
    rounds: list[dict[str, Any]] = []
    points: list[tuple[Plan, float, float]] = []  # plan, its figure, dense beside it
    history: list[tuple[Plan, fx.GraphModule, Solution, dict]] = []
    solved_for: dict[int, Plan] = {}  # id(plan) -> the solved (constrained) plan it lifts
    warm: Solution | None = None
    timings.update(solve_s=0.0, rewrite_s=0.0, measure_s=0.0)
    for r in range(max_rounds):
        target = budget_ms * (1 - margin)
        start = time.perf_counter()
        try:
            sol = _solve(solver, pp, target, warm, opts)
        except InfeasibleBudget as exc:
            if r > 0:
                log.say(f"round {r}: the re-calibrated target {target:.3f} ms is out of reach")
                break
            try:  # the minimum may lie between the target and the budget: try the budget
                if not exc.min_latency <= budget_ms:  # (also catches NaN)
                    raise
                sol = _solve(solver, pp, budget_ms, warm, opts)
            except InfeasibleBudget as again:
                raise InfeasibleBudget(
                    budget_ms,
                    again.min_latency,
                    dense_ms,
                    block_removal=_block_removal_hint(pp, solver, allow_block_removal, problem),
                    layout_block=_layout_floor_hint(analysis, tables),
                ) from None
        timings["solve_s"] += time.perf_counter() - start
        start = time.perf_counter()
        solved = plan = pp.plan(sol, _notes(analysis, importance.method, budget, solver))
        if coupling == "unconstrained":
            from fxprune.unconstrained.masks import consumer_choice

            allowed = {g.name: g.counts for g in pp.problem.groups}  # the tables' candidates
            plan = consumer_choice(analysis, solved, align=allowed)
            if reads == "measure":
                from fxprune.measure.export_choice import measured_rewrite

                pruned, info, choice = measured_rewrite(
                    analysis, plan, rewrite_options["read_cost"]
                )
            else:
                pruned, info = rewrite(analysis, plan, **rewrite_options)
                choice = None
            # record the reads taken so rebuild() reproduces this exact structure
            notes = {**plan.notes, "reads": info.kinds()}
            if info.segment_block is not None:
                notes["segment_block"] = info.segment_block
            if info.segment_cost is not None:
                notes["segment_cost"] = dataclasses.asdict(info.segment_cost)
            if info.read_block is not None:
                notes["read_block"] = info.read_block
            plan = dataclasses.replace(plan, notes=notes)
            export = _export_record(pruned, info, choice, str(rewrite_options["reads"]))
        else:
            pruned, export = prune(analysis, plan), None
        solved_for[id(plan)] = solved
        timings["rewrite_s"] += time.perf_counter() - start
        start = time.perf_counter()
        with log.spinner(f"round {r}: measuring pruned and dense side by side"):
            m_p, m_d = measure_side_by_side(
                be, [pruned, analysis.gm], analysis.example_inputs, measure_config, sessions
            )
        timings["measure_s"] += time.perf_counter() - start
        dense_ms = m_d.median_ms
        # the pruned figure as the paired ratio to the dense one, times the dense figure: the
        # host's drift between alternation rounds cancels out of it
        measured_ms = relative_latency(m_p, m_d) * dense_ms
        budget_ms = budget.resolve(dense_ms)
        met = measured_ms <= budget_ms * (1 + tolerance)
        record = {
            "round": r,
            "target_ms": target,
            "predicted_ms": sol.latency,
            "measured_ms": measured_ms,
            "measured_stable": m_p.stable,
            "dense_ms": dense_ms,
            "budget_ms": budget_ms,
            "measured_over_budget": measured_ms / budget_ms,
            "met": met,
            "importance_kept": sol.objective,
            "removed_blocks": len(sol.removed),
            "solver": sol.solver,
            "status": sol.status,
            "gap": sol.gap,
            "solve_s": sol.time_s,
        }
        if export is not None:
            record["export"] = export
        rounds.append(record)
        history.append((plan, pruned, sol, record))
        log.say(
            f"round {r}: predicted {sol.latency:.3f} ms, measured {measured_ms:.3f} ms "
            f"(budget {budget_ms:.3f} ms, dense {dense_ms:.3f} ms) → "
            f"{'met' if met else 'missed'}; importance kept {sol.objective:.1%}"
        )
        if met and measured_ms >= budget_ms * (1 - slack):
            break
        # the tables price the solved plan: an unconstrained export's extra cost (the union,
        # copies) is learnt by the refit like any other model error
        points.append((solved, measured_ms, dense_ms))
        if r + 1 < max_rounds:  # refit on everything measured, dense at its latest figure
            _recalibrate(latency, analysis, points, dense_ms)
            pp = problem()
            warm = solution_from_plan(pp, solved) if met else None
    met_rounds = [h for h in history if h[3]["met"]]
    if met_rounds:  # the most important plan that met the budget
        plan, pruned, sol, record = max(met_rounds, key=lambda h: h[2].objective)
    else:
        plan, pruned, sol, record = min(history, key=lambda h: h[3]["measured_over_budget"])
        warnings.warn(
            f"fxprune.compile: no round met the budget {budget} within {tolerance:.0%} after "
            f"{len(rounds)} rounds (closest: {record['measured_over_budget']:.3f}× budget). "
            "Returning the closest plan; raise max_rounds or the budget.",
            RuntimeWarning,
            stacklevel=2,
        )
    from fxprune.pipeline.report import count_macs, count_params

    return CompileResult(
        model=pruned,
        plan=plan,
        analysis=analysis,
        budget=budget,
        budget_ms=record["budget_ms"],
        dense_ms=record["dense_ms"],
        predicted_ms=record["predicted_ms"],
        measured_ms=record["measured_ms"],
        budget_met=bool(record["met"]),
        # unconstrained: the solved plan's share (each consumer then keeps its own best inputs,
        # so this is a lower bound; the group-level union would overstate it)
        importance_kept=pp.importance_kept(solved_for[id(plan)]),
        importance_method=importance.method,
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
        rounds=rounds,
        timings={**timings, "total_s": sum(timings.values())},
        backend=identity_label(be.identity()),
        params=(count_params(analysis.gm), count_params(pruned)),
        macs=(
            count_macs(analysis.gm),
            count_macs(pruned),  # the rewrite refreshed its shapes
        ),
        tables=tables,
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


def _dense_result(
    analysis: Analysis,
    budget: Budget,
    dense_ms: float,
    be: Backend,
    timings: dict[str, float],
    log: _Log,
) -> CompileResult:
    """The dense model, unchanged, for a budget it already meets (measured once, nothing solved)."""
    from fxprune.pipeline.report import count_macs, count_params

    budget_ms = budget.resolve(dense_ms)
    note = (
        f"the dense model already meets the budget ({dense_ms:.4g} ms ≤ {budget_ms:.4g} ms): "
        "nothing pruned"
    )
    log.say(note)
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
        backend=identity_label(be.identity()),
        params=(params, params),
        macs=(macs, macs),
        dense_meets_budget=True,
    )


def _recalibrate(
    latency: LatencyModel,
    analysis: Analysis,
    points: list[tuple[Plan, float, float]],
    dense_ms: float,
) -> None:
    """Refit ``a·Σ + b`` on every measured plan and the dense model's latest figure.

    Each plan's figure is first scaled by (latest dense / dense measured beside it): the host
    drifts by 10% and more between rounds, and fitting raw figures taken at different drift
    levels made EfficientNet-B0 chase its budget for four rounds. With few points on a noisy
    host the fit can still turn absurd (a slope near 0 or negative); then the slope is kept
    and only the offset moves so the last plan is predicted as measured.
    """
    scaled = [(plan, m * dense_ms / d) for plan, m, d in points]
    a = latency.a
    latency.calibrate(
        [p for p, _ in scaled] + [Plan.empty(analysis)],
        [m for _, m in scaled] + [dense_ms],
        include_dense=False,
        per_layer=False,
    )
    if not 0.2 <= latency.a <= 5.0:
        plan, measured = scaled[-1]
        latency.a = a
        latency.b = (
            measured
            - a * latency.feature(plan)
            - latency.per_layer * len(latency.layer_costs(plan))
        )


def _notes(analysis: Analysis, method: str, budget: Budget, solver: str) -> dict[str, Any]:
    return {
        "strategy": f"compile/{solver}",
        "budget": str(budget),
        "importance": method,
        "input_shapes": [list(t.shape) for t in analysis.example_inputs],
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
