"""fxprune: latency-aware structured pruning as torch.fx graph passes.

:func:`compile` does everything: prune a model to a latency budget measured on the target
runtime. The parts: start with :func:`analyze` (trace + channel groups + removable blocks), make or load a
:class:`Plan`, and :func:`prune` to get the smaller GraphModule. Every result can be checked
against :func:`masked_forward`, the masking oracle.
"""

from fxprune.analysis import Analysis, analyze
from fxprune.api import prune, rebuild
from fxprune.compiler import Budget, CompileResult, compile
from fxprune.errors import FxpruneError, PlanError, TraceError
from fxprune.export import export_onnx
from fxprune.passes.channel_rules import (
    register_function_rule,
    register_method_rule,
    register_module_rule,
)
from fxprune.passes.mask import masked_forward
from fxprune.passes.prune_rules import register_pruner
from fxprune.plan import Plan, random_plan
from fxprune.report import analysis_report, render_markdown
from fxprune.solver import InfeasibleBudget
from fxprune.strategies import uniform_plan
from fxprune.unconstrained import magnitude_masks, masks_from_zeros, unconstrained_plan

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "Budget",
    "CompileResult",
    "FxpruneError",
    "InfeasibleBudget",
    "Plan",
    "PlanError",
    "TraceError",
    "analysis_report",
    "analyze",
    "compile",
    "export_onnx",
    "magnitude_masks",
    "masked_forward",
    "masks_from_zeros",
    "prune",
    "random_plan",
    "rebuild",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "register_pruner",
    "render_markdown",
    "unconstrained_plan",
    "uniform_plan",
]
