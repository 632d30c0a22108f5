"""Re-estimate the normalisation statistics of a pruned model on calibration data.

A pruned model keeps each BatchNorm's running mean and variance of the channels it kept, but
the layer in front of it now sums over fewer input channels (and a removed block no longer adds
into the stream), so the statistics no longer describe what reaches the norm: a trained model
pruned this way often predicts at chance until they are re-estimated. This pass recomputes them
from data, without training: every norm with running statistics is reset and switched to a
cumulative average (``momentum=None``), the model runs forward under ``no_grad`` with only those
norms in training mode (dropout and the rest stay in eval), and every module's training flag and
momentum are restored. Under an initialised ``torch.distributed`` process group the statistics
are averaged over ranks (weighted by their batch counts), so every rank ends with the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.core.batches import split_batch

__all__ = ["Recalibration", "recalibrate_norms"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    """What :func:`recalibrate_norms` did: how many norm layers, on how many batches."""

    modules: int
    batches: int

    def to_dict(self) -> dict[str, int]:
        return {"modules": self.modules, "batches": self.batches}


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and m.running_mean is not None
    ]


def recalibrate_norms(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None
) -> Recalibration:
    """Recompute the running statistics of ``model``'s norms (in place) from ``data``.

    Args:
        model: typically the pruned model (:func:`fxprune.prune` or ``compile``'s result).
        data: batches ``(inputs, target)`` or inputs alone, as for importance; targets are
            ignored. Give a re-iterable (a list, a DataLoader), not a spent iterator.
        max_batches: batches used (None: all of ``data``).

    Returns:
        How many norm layers were re-estimated on how many batches; ``batches`` is 0 (and the
        statistics are untouched) when ``data`` gave none or the model has no such norm.
    """
    norms = _norms(model)
    if not norms:
        return Recalibration(0, 0)
    saved = [(m, m.momentum, {k: v.clone() for k, v in _stats(m).items()}) for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    batches = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in data:
                if max_batches is not None and batches >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                model(*inputs)
                batches += 1
        if batches == 0:  # nothing seen: keep the statistics the model had
            for m, _, stats in saved:
                for k, v in stats.items():
                    getattr(m, k).copy_(v)
        else:
            batches = _average_over_ranks(norms, batches)
    finally:
        for m, momentum, *_ in saved:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if batches == 0:
        logger.warning(
            "recalibrate_norms: data gave no batches, statistics unchanged (a spent iterator? "
            "pass a list or a DataLoader)"
        )
    return Recalibration(len(norms), batches)


def _stats(m: nn.modules.batchnorm._NormBase) -> dict[str, torch.Tensor]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {k: getattr(m, k) for k in names if getattr(m, k, None) is not None}


def _average_over_ranks(norms: list[nn.modules.batchnorm._NormBase], batches: int) -> int:
    """Average the statistics over ranks, weighted by batch count; the total batch count."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return batches
    flat = torch.cat(
        [torch.cat([m.running_mean, m.running_var]).double() * batches for m in norms]
        + [torch.tensor([float(batches)], dtype=torch.float64)]
    )
    dist.all_reduce(flat)
    total = flat[-1]
    offset = 0
    for m in norms:
        n = m.running_mean.numel()
        m.running_mean.copy_((flat[offset : offset + n] / total).to(m.running_mean.dtype))
        m.running_var.copy_((flat[offset + n : offset + 2 * n] / total).to(m.running_var.dtype))
        offset += 2 * n
    return int(total.item())
