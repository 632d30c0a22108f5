"""``fxprune.compile_progressively``: reach a latency budget in several prune–fine-tune steps.

MDP prunes once: one solve at the final budget, then fine-tuning. HALP-style schedules prune
a little at a time and let the network recover between steps, so each step's importance is
measured on a network that has adapted to the previous cut. This module runs that schedule
with the single-pass machinery: step ``i`` of ``k`` compiles the current model to the budget
``budget^(i/k)`` of the *original* dense latency — a fraction of the current model's latency
equal to that target over the ratio reached so far, so a step that lands under or over its
target is made up by the next — then fine-tunes it on ``data`` (distilling from the original
model) before the next step. The last step is not fine-tuned: the caller fine-tunes the result
as it would a single-pass one, so the two are compared at equal final training.

The ratio reached so far is measured, not multiplied: after each step the current model is
timed side by side with the original. Step ratios do not compose (on a small model a fixed
per-run overhead makes each step's ratio against its own input optimistic about the whole),
so the next step's budget is set from that measurement, and the result reports it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from fxprune.analysis.trace import ExampleInputs
from fxprune.backends import Backend, get_backend, measure_side_by_side
from fxprune.core.errors import ConfigError
from fxprune.pipeline.compile import CompileResult, compile
from fxprune.pipeline.config import CompileConfig
from fxprune.tuning.finetune import FinetuneConfig, FinetuneResult, finetune

__all__ = ["ProgressiveConfig", "ProgressiveResult", "compile_progressively"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressiveConfig:
    """The progressive schedule.

    Attributes:
        steps: prune–fine-tune steps (1 is single-pass ``compile``).
        finetune: how the model is fine-tuned between steps (not after the last).
    """

    steps: int = 3
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(progress=False))

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"ProgressiveConfig.steps must be an integer ≥ 1, got {self.steps!r}")
        if not isinstance(self.finetune, FinetuneConfig):
            raise ConfigError(
                f"ProgressiveConfig.finetune must be a FinetuneConfig, got {self.finetune!r}"
            )


@dataclass(frozen=True)
class ProgressiveResult:
    """The final pruned model and every step that led to it.

    Attributes:
        model: the last step's pruned model (not fine-tuned after that step).
        steps: each step's :class:`CompileResult`, in order.
        targets: the cumulative budget each step aimed at (a fraction of the original latency).
        finetuning: the fine-tuning between steps (one fewer than ``steps``).
        reached: after each step, its model's latency as a fraction of the original's,
            measured side by side with it; the last is the result's :attr:`ratio`.
        tolerance: the budget loop's (``LoopConfig.tolerance``), for :attr:`budget_met`.
    """

    model: fx.GraphModule
    steps: tuple[CompileResult, ...]
    targets: tuple[float, ...]
    finetuning: tuple[FinetuneResult, ...]
    reached: tuple[float, ...]
    tolerance: float = 0.0

    @property
    def ratio(self) -> float:
        """The final latency as a fraction of the original's, measured side by side."""
        return self.reached[-1]

    @property
    def budget_met(self) -> bool:
        """Whether the final model, measured against the original, meets the budget (within
        the budget loop's ``tolerance``)."""
        return self.ratio <= self.targets[-1] * (1 + self.tolerance)

    def summary(self) -> dict[str, Any]:
        """What was done, for a report: the schedule and each step's measured figures."""
        return {
            "schedule": f"progressive, {len(self.steps)} steps",
            "ratio": self.ratio,
            "budget_met": self.budget_met,
            "steps": [
                {
                    "target": t,
                    "step_budget": r.budget_ms / r.dense_ms,
                    "step_ratio": r.measured_ms / r.dense_ms,
                    "reached": reached,
                    "importance_method": r.importance_method,
                    "removed_blocks": len(r.plan.removed_blocks),
                }
                for t, r, reached in zip(self.targets, self.steps, self.reached, strict=True)
            ],
            "finetune_epochs_between_steps": [len(f.losses) for f in self.finetuning],
        }


def compile_progressively(
    model: nn.Module,
    latency_budget: float,
    *,
    example_inputs: ExampleInputs,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    max_batches: int | None = None,
    backend: str | Backend = "onnxruntime",
    config: CompileConfig | None = None,
    schedule: ProgressiveConfig | None = None,
) -> ProgressiveResult:
    """Prune ``model`` to ``latency_budget`` (a fraction of its measured latency) in steps.

    Args:
        model: the trained dense model (copied; never modified); also the teacher of the
            fine-tuning between steps.
        latency_budget: the final budget, a fraction in ``(0, 1)`` of the dense latency.
        example_inputs, max_batches, backend, config: as :func:`~fxprune.compile`, for every
            step.
        data, loss_fn: the training batches ``(inputs, target)``: Taylor importance at each
            step (``max_batches`` of them) and the fine-tuning between steps.
        schedule: :class:`ProgressiveConfig` (the defaults when ``None``).

    Raises:
        ConfigError: a budget that is not a fraction in ``(0, 1)``, or a bad schedule.
        InfeasibleBudget: from the step that could not reach its target.
    """
    schedule = schedule or ProgressiveConfig()
    config = config or CompileConfig()
    budget = latency_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ConfigError(
            "compile_progressively needs the budget as a fraction of the dense latency in "
            f"(0, 1), got {latency_budget!r}; for an absolute time use fxprune.compile"
        )
    teacher = copy.deepcopy(model).eval()
    current: nn.Module = teacher
    results: list[CompileResult] = []
    targets: list[float] = []
    tuned: list[FinetuneResult] = []
    reached: list[float] = []
    be = get_backend(backend) if isinstance(backend, str) else backend
    for i in range(1, schedule.steps + 1):
        target = budget ** (i / schedule.steps)
        step = min(1.0, target / (reached[-1] if reached else 1.0))
        logger.info(
            "progressive step %d/%d: cumulative target %.3f, step budget %.3f",
            i,
            schedule.steps,
            target,
            step,
        )
        result = compile(
            current,
            step,
            example_inputs=example_inputs,
            data=data,
            loss_fn=loss_fn,
            max_batches=max_batches,
            backend=be,
            config=config,
        )
        results.append(result)
        targets.append(target)
        current = result.model
        original = results[0].analysis
        now, dense = measure_side_by_side(
            be, [current, original.gm], original.example_inputs, config.measure,
            config.loop.sessions,
        )  # fmt: skip
        reached.append(now.median_ms / dense.median_ms)
        if i < schedule.steps:
            tuned.append(
                finetune(current, data, teacher=teacher, loss_fn=loss_fn, config=schedule.finetune)
            )
    return ProgressiveResult(
        results[-1].model,
        tuple(results),
        tuple(targets),
        tuple(tuned),
        tuple(reached),
        config.loop.tolerance,
    )
