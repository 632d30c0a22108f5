"""fxprune: latency-aware structured pruning as torch.fx graph passes.

:func:`compile` does everything: prune a model to a latency budget measured on the target
runtime (:func:`sweep`: to many budgets at once, the latency / quality frontier); its settings
are one :class:`CompileConfig` (:class:`SolveConfig`, :class:`LoopConfig`,
:class:`UnconstrainedConfig`, :class:`LatencyConfig`, :class:`MeasureConfig`). The parts: start
with :func:`analyze` (trace + channel groups + removable blocks), make or load a :class:`Plan`,
and :func:`prune` to get the smaller GraphModule (then :func:`recalibrate_norms` on data, and
:func:`finetune`, for a trained model); :func:`compile_progressively` reaches a budget in
several prune–fine-tune steps. Every result can be checked against
:func:`masked_forward`, the masking oracle. :func:`backend` prunes inside ``torch.compile``
(a dynamo backend, also registered as ``backend="fxprune"``), for inference.

The package is layered (each imports only those before it): ``core`` → ``analysis`` (and
``solver``) → ``unconstrained`` → ``rewrite`` → ``backends`` → ``measure`` → ``latency`` →
``pipeline`` → this module and the CLI. See CONTRIBUTING.md.
"""

from fxprune.analysis import Analysis, analyze
from fxprune.analysis.channel_rules import (
    register_function_rule,
    register_method_rule,
    register_module_rule,
)
from fxprune.analysis.plans import uniform_plan
from fxprune.backends import MeasureConfig
from fxprune.backends.export import export_onnx
from fxprune.core.errors import FxpruneError, PlanError, ShapeError, TraceError
from fxprune.core.plan import Plan
from fxprune.latency.tables import LatencyConfig
from fxprune.pipeline.compile import Budget, CompileResult, compile
from fxprune.pipeline.config import (
    CompileConfig,
    LoopConfig,
    ObjectiveConfig,
    SolveConfig,
    UnconstrainedConfig,
)
from fxprune.pipeline.dynamo_backend import backend
from fxprune.pipeline.progressive import ProgressiveConfig, ProgressiveResult, compile_progressively
from fxprune.pipeline.report import analysis_report, render_markdown
from fxprune.pipeline.sweep import SweepPoint, SweepResult, sweep
from fxprune.rewrite.api import prune, rebuild
from fxprune.rewrite.mask import masked_forward
from fxprune.rewrite.pruners import register_pruner
from fxprune.solver import InfeasibleBudget, InfeasibleLimit
from fxprune.tuning import FinetuneConfig, finetune, recalibrate_norms
from fxprune.unconstrained.masks import magnitude_masks, masks_from_zeros, unconstrained_plan

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "Budget",
    "CompileConfig",
    "CompileResult",
    "FinetuneConfig",
    "FxpruneError",
    "InfeasibleBudget",
    "InfeasibleLimit",
    "LatencyConfig",
    "LoopConfig",
    "MeasureConfig",
    "ObjectiveConfig",
    "Plan",
    "PlanError",
    "ProgressiveConfig",
    "ProgressiveResult",
    "ShapeError",
    "SolveConfig",
    "SweepPoint",
    "SweepResult",
    "TraceError",
    "UnconstrainedConfig",
    "analysis_report",
    "analyze",
    "backend",
    "compile",
    "compile_progressively",
    "export_onnx",
    "finetune",
    "magnitude_masks",
    "masked_forward",
    "masks_from_zeros",
    "prune",
    "rebuild",
    "recalibrate_norms",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "register_pruner",
    "render_markdown",
    "sweep",
    "unconstrained_plan",
    "uniform_plan",
]
