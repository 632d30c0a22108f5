"""Probes: small measurements that price a runtime's primitive costs for rewrite decisions.

:func:`measure_read_cost` prices a channel copy (slice, gather) and a multiply-accumulate on a
backend, so the unconstrained rewrite can decide, per consumer, whether reading its kept inputs
with a copy pays for the multiply-adds it saves (:mod:`fxprune.passes.reads`). Four 1×1 convs at
28×28 are timed: 96→192 on a 96-channel input, 192→192, and 96→192 fed by a slice or a gather of
96 of 192 channels; differences against the first give each price.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.backends.base import Backend, MeasureConfig
from fxprune.passes.reads import ReadCost

__all__ = ["measure_read_cost"]

_C, _HW = 192, 28


class _Read(nn.Module):
    def __init__(self, kind: str, c_in: int) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c_in, _C, 1)
        idx = np.sort(np.random.default_rng(0).choice(_C, _C // 2, replace=False))
        self.register_buffer("idx", torch.from_numpy(idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "slice":
            x = torch.narrow(x, 1, 0, _C // 2)
        elif self.kind == "gather":
            x = torch.index_select(x, 1, self.idx)
        return self.conv(x)


def measure_read_cost(backend: Backend, config: MeasureConfig | None = None) -> ReadCost:
    """Seconds per copied element (slice, gather) and per MAC, measured on ``backend``."""
    config = config or MeasureConfig(warmup=10, repeats=50)
    torch.manual_seed(0)
    half = torch.randn(1, _C // 2, _HW, _HW)
    full = torch.randn(1, _C, _HW, _HW)
    with torch.no_grad():
        t = {
            kind: backend.measure(_Read(kind, c).eval(), (x,), config).median_ms * 1e-3
            for kind, c, x in (
                ("small", _C // 2, half),
                ("full", _C, full),
                ("slice", _C // 2, full),
                ("gather", _C // 2, full),
            )
        }
    elements = (_C // 2) * _HW * _HW
    macs = (_C // 2) * _C * _HW * _HW
    return ReadCost(
        slice_s_per_element=max(t["slice"] - t["small"], 0.0) / elements,
        gather_s_per_element=max(t["gather"] - t["small"], 0.0) / elements,
        mac_s=max(t["full"] - t["small"], 1e-15 * macs) / macs,
    )
