"""Fine-tune a pruned model, distilling from the dense one.

The loss of a batch ``(inputs, target)`` is ``kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))
+ (1 − kd_weight) · loss_fn(s, target)`` with ``s`` the student's and ``t`` the teacher's
output (Hinton et al.'s soft targets; ``T²`` keeps the gradient scale independent of ``T``).
Without a teacher it is the task loss; without targets it is distillation alone. Outputs may be
tensors or dicts / tuples / lists of them: the distillation term sums over matching tensors.

Training is SGD with Nesterov momentum under a one-cycle, cosine or constant schedule, and is
deterministic under ``seed``: the global torch generator is reseeded at the start of every
epoch (so a DataLoader's shuffle and dropout draw the same numbers whether or not the run was
resumed). A checkpoint written at the end of every epoch (atomically) holds the model, the
optimiser and the scheduler, and ``resume=True`` continues from it bit for bit.

Under an initialised ``torch.distributed`` process group the model runs as
``DistributedDataParallel`` (gloo on CPU, nccl on GPU): each rank feeds its own shard of the
data (a ``DistributedSampler``), gradients are averaged, and buffers (BatchNorm statistics)
are broadcast from rank 0 at every epoch end, so every rank holds the same weights. BatchNorm
normalises each rank's shard with its own batch statistics, as plain DDP does (convert with
``nn.SyncBatchNorm`` on GPU for global ones). Only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from fxprune.core.batches import split_batch
from fxprune.core.errors import ConfigError
from fxprune.core.io import atomic_write
from fxprune.core.progress import reporter

__all__ = ["FinetuneConfig", "FinetuneResult", "distillation_loss", "finetune"]

logger = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class FinetuneConfig:
    """How :func:`finetune` trains.

    Attributes:
        epochs: passes over ``data``.
        lr: the peak learning rate (one-cycle), or the initial one.
        momentum, weight_decay, nesterov: SGD's.
        schedule: ``"onecycle"`` (warm up for 30 % of the steps, then anneal), ``"cosine"``
            or ``"constant"``.
        temperature: the distillation temperature ``T``.
        kd_weight: the distillation term's weight in ``[0, 1]`` (used when there is a teacher
            and targets; otherwise the one loss there is counts fully).
        max_batches: batches per epoch (None: all of ``data``); needed for a schedule over data
            without a length.
        seed: seeds the global torch generator at every epoch start.
        checkpoint: a file written at every epoch end (None: none).
        resume: continue from ``checkpoint`` if it exists.
        progress: report progress per batch (``fxprune.core.progress``).
    """

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: str = "onecycle"
    temperature: float = 4.0
    kd_weight: float = 0.5
    max_batches: int | None = None
    seed: int = 0
    checkpoint: str | os.PathLike | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, want: str) -> None:
            raise ConfigError(f"FinetuneConfig.{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            fail("epochs", "an integer ≥ 1")
        for name in ("lr", "temperature"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                fail(name, "a number > 0")
        for name in ("momentum", "weight_decay"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                fail(name, "a number ≥ 0")
        if not isinstance(self.kd_weight, (int, float)) or not 0 <= self.kd_weight <= 1:
            fail("kd_weight", "a number in [0, 1]")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {', '.join(SCHEDULES)}")
        if self.max_batches is not None and (
            not isinstance(self.max_batches, int) or self.max_batches < 1
        ):
            fail("max_batches", "an integer ≥ 1 or None")
        if self.resume and self.checkpoint is None:
            fail("resume", "False when there is no checkpoint path")


@dataclass
class FinetuneResult:
    """The mean training loss of every epoch, and the optimiser steps taken in all."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from_epoch: int = 0


def distillation_loss(student: Any, teacher: Any, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch, summed over every
    output tensor (the class dim is the last one)."""
    s_leaves, s_spec = pytree.tree_flatten(student)
    t_leaves, t_spec = pytree.tree_flatten(teacher)
    if s_spec != t_spec:
        raise ValueError(f"student and teacher outputs differ in structure: {s_spec} vs {t_spec}")
    terms = []
    for s, t in zip(s_leaves, t_leaves, strict=True):
        s = s.reshape(-1, s.shape[-1]) if s.ndim > 1 else s.reshape(1, -1)
        t = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
        log_p = F.log_softmax(s / temperature, dim=-1)
        q = F.softmax(t.detach() / temperature, dim=-1)
        terms.append(F.kl_div(log_p, q, reduction="batchmean") * temperature**2)
    if not terms:
        raise ValueError("distillation_loss: the outputs hold no tensor")
    return torch.stack(terms).sum()


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    *,
    teacher: nn.Module | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = F.cross_entropy,
    config: FinetuneConfig | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``data``, distilling from ``teacher`` when given.

    Args:
        model: the pruned model (any ``nn.Module``: a constrained or unconstrained
            GraphModule). It is left in eval mode.
        data: a re-iterable of batches ``(inputs, target)`` or inputs alone (then ``teacher``
            is needed); under ``torch.distributed``, this rank's shard.
        teacher: the dense model; run in eval mode without gradients, never changed.
        loss_fn: the task loss ``loss_fn(output, target)``; ``None``: distillation only.
        config: :class:`FinetuneConfig` (the defaults when ``None``).

    Raises:
        ValueError: a batch has neither a target nor a teacher to learn from, or ``data`` is
            empty.
    """
    config = config or FinetuneConfig()
    steps_per_epoch = _steps_per_epoch(data, config)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov and config.momentum > 0,
    )
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    result = FinetuneResult()
    start = _resume(model, optimizer, scheduler, result, config)
    student = _distributed(model)
    teacher_modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        teacher.eval()
    task = reporter().add_task("fine-tune", total=(config.epochs - start) * steps_per_epoch)
    try:
        for epoch in range(start, config.epochs):
            torch.manual_seed(config.seed + epoch)
            model.train()
            total, batches = 0.0, 0
            for batch in data:
                if config.max_batches is not None and batches >= config.max_batches:
                    break
                loss = _loss(student, teacher, loss_fn, batch, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None and result.steps + 1 < _total_steps(
                    config, steps_per_epoch
                ):
                    scheduler.step()
                result.steps += 1
                total += float(loss.detach())
                batches += 1
                if config.progress:
                    reporter().advance(task)
            if batches == 0:
                raise ValueError("finetune: data gave no batches (a spent iterator?)")
            result.losses.append(total / batches)
            logger.info("fine-tune epoch %d: loss %.4g", epoch + 1, result.losses[-1])
            _sync_buffers(model)
            _save(model, optimizer, scheduler, result, epoch + 1, config)
    finally:
        model.eval()
        for m, training in teacher_modes:
            m.training = training
    return result


def _steps_per_epoch(data: Iterable[Any], config: FinetuneConfig) -> int:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        if config.max_batches is None and config.schedule != "constant":
            raise ConfigError(
                "finetune: data has no len(), so the schedule cannot be planned: give "
                "FinetuneConfig(max_batches=...) or schedule='constant'"
            ) from None
        n = config.max_batches or 1
    return max(1, min(n, config.max_batches) if config.max_batches else n)


def _total_steps(config: FinetuneConfig, steps_per_epoch: int) -> int:
    return config.epochs * steps_per_epoch


def _scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int):
    total = _total_steps(config, steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.3
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return None


def _loss(student, teacher, loss_fn, batch: Any, config: FinetuneConfig) -> torch.Tensor:
    inputs, target = split_batch(batch)
    out = student(*inputs)
    task = None if target is None or loss_fn is None else loss_fn(out, target)
    if teacher is None:
        if task is None:
            raise ValueError(
                "finetune: a batch without a target (or loss_fn=None) needs a teacher to "
                "distil from: pass teacher=the dense model"
            )
        return task
    with torch.no_grad():
        soft = teacher(*inputs)
    kd = distillation_loss(out, soft, config.temperature)
    if task is None:
        return kd
    return config.kd_weight * kd + (1 - config.kd_weight) * task


def _world() -> tuple[int, int] | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _distributed(model: nn.Module) -> nn.Module:
    """``model`` wrapped for data-parallel training under a process group, else itself."""
    if _world() is None:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank (each rank's BatchNorm saw only its shard)."""
    if _world() is None:
        return
    for b in model.buffers():
        torch.distributed.broadcast(b, 0)


def _state(model, optimizer, scheduler, result: FinetuneResult, epoch: int) -> dict[str, Any]:
    return {
        "format": "fxprune.finetune",
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "losses": list(result.losses),
        "steps": result.steps,
    }


def _save(model, optimizer, scheduler, result, epoch: int, config: FinetuneConfig) -> None:
    world = _world()
    if config.checkpoint is None or (world is not None and world[0] != 0):
        return
    state = _state(model, optimizer, scheduler, result, epoch)
    atomic_write(config.checkpoint, lambda tmp: torch.save(state, tmp))


def _resume(model, optimizer, scheduler, result: FinetuneResult, config: FinetuneConfig) -> int:
    """The epoch to start from: the checkpoint's when resuming from one, else 0."""
    if not config.resume or not Path(config.checkpoint).exists():  # type: ignore[arg-type]
        return 0
    path = Path(config.checkpoint)  # type: ignore[arg-type]
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(state, dict) or state.get("format") != "fxprune.finetune":
            raise ValueError("not an fxprune fine-tuning checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except Exception as exc:
        raise ValueError(
            f"cannot resume from {path}: {type(exc).__name__}: {exc}. Delete it (or pass "
            "resume=False) to start again"
        ) from exc
    result.losses[:] = state["losses"]
    result.steps = int(state["steps"])
    result.resumed_from_epoch = int(state["epoch"])
    return int(state["epoch"])
