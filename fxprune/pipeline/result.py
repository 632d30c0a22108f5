"""What :func:`fxprune.compile` returns: the budget, each round's figures, the result.

:class:`Round` is one solve–rewrite–measure round of the budget loop; its :meth:`Round.to_dict`
is the round's record in ``report.json`` (the keys saved reports have always had).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from fxprune.analysis import Analysis
from fxprune.core.plan import Plan
from fxprune.latency.tables import LatencyTables

if TYPE_CHECKING:
    from fxprune.measure.export_choice import ExportChoice
    from fxprune.tuning.recalibrate import Recalibration

__all__ = ["SAVED_FILES", "Budget", "CompileResult", "Round", "RoundExport"]

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


@dataclass(frozen=True)
class RoundExport:
    """How an unconstrained round was exported: the variant kept, its copies, its segments.

    Attributes:
        kept: what the whole-model check chose (``exact`` / ``measured`` / ``segmented`` /
            ``lean`` / ``aligned`` / ``aligned_lean``) with ``reads="measure"``, else the read
            policy itself.
        gathers, slices: channel copies the exported model runs.
        vs_exact: each other candidate's latency as a multiple of the exact reads'.
        runoff: the second look at a close call, if there was one.
        segments: tensors carried as segments.
        choice: the whole-model check's full record (None unless ``reads="measure"`` compared
            variants).
    """

    kept: str
    gathers: int
    slices: int
    vs_exact: dict[str, float] = field(default_factory=dict)
    runoff: dict[str, Any] | None = None
    segments: int = 0
    choice: ExportChoice | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (``export`` in a round of ``report.json``)."""
        out: dict[str, Any] = {"kept": self.kept, "gathers": self.gathers, "slices": self.slices}
        out["vs_exact"] = self.vs_exact
        if self.runoff:
            out["runoff"] = self.runoff
        out["segments"] = self.segments
        return out


@dataclass(frozen=True)
class Round:
    """One round of the budget loop: the target solved for, the plan's figures, the verdict.

    Latencies are in ms; ``measured_ms`` and ``dense_ms`` were measured side by side in this
    round and ``budget_ms`` is the budget resolved on that dense figure.
    """

    round: int
    target_ms: float
    predicted_ms: float
    measured_ms: float
    measured_stable: bool
    dense_ms: float
    budget_ms: float
    met: bool
    #: the solver's objective: the share of prunable importance the solved plan keeps
    importance_kept: float
    removed_blocks: int
    solver: str
    status: str
    gap: float
    solve_s: float
    #: how an unconstrained round was exported (None: constrained)
    export: RoundExport | None = None
    #: per further backend (``CompileConfig.also``): ``target_ms``, ``predicted_ms``,
    #: ``measured_ms`` and ``dense_ms`` (measured side by side there), ``budget_ms``, ``met``
    also: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: side-by-side measurements the figures average (2: confirmed near the budget,
    #: ``LoopConfig.confirm``)
    measurements: int = 1

    @property
    def measured_over_budget(self) -> float:
        return self.measured_ms / self.budget_ms

    @property
    def all_met(self) -> bool:
        """The budget was met, and every further backend's too."""
        return bool(self.met) and all(v["met"] for v in self.also.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (one entry of ``rounds`` in ``report.json``)."""
        out = {
            "round": self.round,
            "target_ms": self.target_ms,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_stable": self.measured_stable,
            "dense_ms": self.dense_ms,
            "budget_ms": self.budget_ms,
            "measured_over_budget": self.measured_over_budget,
            "met": self.met,
            "importance_kept": self.importance_kept,
            "removed_blocks": self.removed_blocks,
            "solver": self.solver,
            "status": self.status,
            "gap": self.gap,
            "solve_s": self.solve_s,
            "measurements": self.measurements,
        }
        if self.export is not None:
            out["export"] = self.export.to_dict()
        if self.also:
            out["also"] = self.also
        return out


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
    rounds: list[Round]
    timings: dict[str, float]
    backend: str
    params: tuple[int, int] = (0, 0)
    macs: tuple[int, int] = (0, 0)
    tables: LatencyTables | None = field(default=None, repr=False)
    #: the budget was already met by the dense model: ``model`` is it, unchanged, measured once
    dense_meets_budget: bool = False
    #: the pruned model's norm statistics were re-estimated on ``data`` (``None``: they were
    #: not: no data, or ``CompileConfig.recalibrate=False``); see :func:`fxprune.recalibrate_norms`
    recalibration: Recalibration | None = None
    #: per resource limit of the config (``"params"``, ``"macs"``, ``"activation_bytes"``):
    #: ``limit``, ``predicted`` (the solver's row; for activation bytes its largest row),
    #: ``measured`` (counted on ``model``) and whether it was ``met``
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.measured_ms

    @property
    def limits_met(self) -> bool:
        """Every resource limit holds on the pruned model (True when none was set)."""
        return all(v["met"] for v in self.limits.values())

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
            "norms_recalibrated_on_batches": (
                self.recalibration.batches if self.recalibration else None
            ),
            **{  # only the limits that were set: a report without limits keeps its keys
                key: value
                for name, v in self.limits.items()
                for key, value in (
                    (f"max_{name}", v["limit"]),
                    (f"{name}_predicted", v["predicted"]),
                    (f"{name}_measured", v["measured"]),
                    (f"{name}_limit_met", v["met"]),
                )
            },
        }

    def report(self) -> dict[str, Any]:
        """The analysis report of the plan plus the compile section (JSON-ready)."""
        from fxprune.pipeline.report import analysis_report

        report = analysis_report(self.analysis, self.plan, self.model)
        report["summary"].update(self.summary())
        report["solver"] = self.solver
        report["rounds"] = [r.to_dict() for r in self.rounds]
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
        from fxprune.pipeline.report import render_markdown, rounds_markdown

        def write(out: Path) -> None:
            if onnx:  # the likeliest failure: first
                example = self.analysis.example_inputs
                export_onnx(self.model, out / "pruned.onnx", example, dynamic_batch=dynamic_batch)
            self.plan.save(out / "plan.json")
            torch.save(self.model.state_dict(), out / "pruned_state_dict.pt")
            torch.save(self.model, out / "pruned_model.pt")
            report = self.report()
            write_json(out / "report.json", report)
            write_text(
                out / "report.md", render_markdown(report) + rounds_markdown(report["rounds"])
            )
            try:
                from fxprune.pipeline.plots import plot_widths

                plot_widths(self.analysis, self.plan, out / "widths.png")
            except ImportError:  # matplotlib is optional
                pass

        return replace_files(directory, SAVED_FILES, write)

    def exported_program(self, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
        """The pruned model as a ``torch.export.ExportedProgram``, for PT2 deployment.

        Exported at the analysis's example inputs (with ``dynamic_batch``, dim 0 dynamic where
        the graph allows it; see :func:`fxprune.backends.export.export_program`). Save it with
        ``torch.export.save``; lower it with AOTInductor
        (``torch._inductor.aoti_compile_and_package``) for a runtime without Python.
        """
        from fxprune.backends.export import export_program

        return export_program(self.model, self.analysis.example_inputs, dynamic_batch=dynamic_batch)

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
