"""Probes: small measurements that price a runtime's primitive costs for rewrite decisions.

:func:`measure_read_cost` prices a channel copy (slice, gather) and a multiply-accumulate on a
backend, so the unconstrained rewrite can decide, per consumer, whether reading its kept inputs
with a copy pays for the multiply-adds it saves (:mod:`fxprune.passes.reads`). Four 1×1 convs at
28×28 are timed: 96→192 on a 96-channel input, 192→192, and 96→192 fed by a slice or a gather of
96 of 192 channels; differences against the first give each price. Every input comes out of a
per-channel conv first, so copies pay the layout conversions they cause inside a model
(:class:`~fxprune.passes.reads.ReadUnit`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.backends.base import Backend, MeasureConfig
from fxprune.passes.reads import ConsumerRead, ReadCost, ReadUnit

__all__ = ["measure_read_cost"]

_C, _HW = 192, 28


def _unit(kind: str, c_in: int) -> nn.Module:
    """A 1×1 conv behind a read of ``kind`` ("full" = the conv reads its whole input)."""
    if kind == "gather":
        local = np.sort(np.random.default_rng(0).choice(_C, _C // 2, replace=False))
    else:
        local = np.arange(_C // 2 if kind == "slice" else c_in)
    read = ConsumerRead(kind, local, np.zeros(local.size, dtype=bool))
    source = _C if kind in ("slice", "gather") else c_in
    return ReadUnit(read, nn.Conv2d(c_in, _C, 1), 1, producer_channels=source).eval()


def measure_read_cost(backend: Backend, config: MeasureConfig | None = None) -> ReadCost:
    """Seconds per copied element (slice, gather) and per MAC, measured on ``backend``."""
    config = config or MeasureConfig(warmup=10, repeats=50)
    torch.manual_seed(0)
    half = torch.randn(1, _C // 2, _HW, _HW)
    full = torch.randn(1, _C, _HW, _HW)
    with torch.no_grad():
        t = {
            kind: backend.measure(_unit(read, c), (x,), config).median_ms * 1e-3
            for kind, read, c, x in (
                ("small", "full", _C // 2, half),
                ("full", "full", _C, full),
                ("slice", "slice", _C // 2, full),
                ("gather", "gather", _C // 2, full),
            )
        }
    elements = (_C // 2) * _HW * _HW
    macs = (_C // 2) * _C * _HW * _HW
    return ReadCost(
        slice_s_per_element=max(t["slice"] - t["small"], 0.0) / elements,
        gather_s_per_element=max(t["gather"] - t["small"], 0.0) / elements,
        mac_s=max(t["full"] - t["small"], 1e-15 * macs) / macs,
    )
