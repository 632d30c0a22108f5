"""Probes: small measurements that price a runtime's primitive costs for rewrite decisions.

:func:`measure_read_cost` prices a channel copy (slice, gather) and a multiply-accumulate on a
backend, so the unconstrained rewrite can decide, per consumer, whether reading its kept inputs
with a copy pays for the multiply-adds it saves (:mod:`fxprune.unconstrained.reads`). Four 1×1 convs at
28×28 are timed: 96→192 on a 96-channel input, 192→192, and 96→192 fed by a slice or a gather of
96 of 192 channels; differences against the first give each price. Every input comes out of a
per-channel conv first, so copies pay the layout conversions they cause inside a model
(:class:`ReadUnit`).

:func:`measure_segment_cost` prices what a segmented tensor (:mod:`fxprune.rewrite.segment`)
pays per extra segment: one more producer conv and one more partial consumer conv.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.backends.base import Backend, MeasureConfig, measure_side_by_side
from fxprune.rewrite.segment import SegmentCost
from fxprune.unconstrained.reads import ConsumerRead, ReadCost

__all__ = ["ReadUnit", "measure_read_cost", "measure_segment_cost"]


class ReadUnit(nn.Module):
    """A consumer behind its read: what one candidate costs on the runtime.

    With ``producer_channels``, the read's input first goes through a per-channel 1×1
    (depthwise) conv, so that it arrives in the layout a conv output has inside the model.
    On ONNX Runtime CPU that can matter more than the copy itself: convs run in a blocked layout
    (NCHWc), and a Slice or Gather on channels makes the optimizer convert the whole tensor
    back to NCHW before the copy and the kept part forward again after it. A unit fed
    straight from its (NCHW) session input pays neither conversion, and so prices an exact
    read too cheaply against a full read, which stays blocked from end to end.
    """

    def __init__(
        self, read: ConsumerRead, layer: nn.Module, dim: int, producer_channels: int = 0
    ) -> None:
        super().__init__()
        self.kind, self.dim, self.layer = read.kind, dim, layer
        self.start, self.length = read.start, read.length
        self.register_buffer("index", torch.from_numpy(read.local.astype(np.int64)))
        self.producer = (
            nn.Conv2d(producer_channels, producer_channels, 1, groups=producer_channels)
            if producer_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.producer(x)
        if self.kind in ("slice", "span"):
            x = torch.narrow(x, self.dim, self.start, self.length)
        elif self.kind == "gather":
            x = torch.index_select(x, self.dim, self.index)
        return self.layer(x)


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


class _Segmented(nn.Module):
    """A producer 1×1 conv (+BN+ReLU) feeding a consumer 1×1 conv, carried as ``k`` segments."""

    def __init__(self, c_in: int, c: int, c_out: int, k: int) -> None:
        super().__init__()
        w = c // k
        self.producers = nn.ModuleList(nn.Conv2d(c_in, w, 1) for _ in range(k))
        self.norms = nn.ModuleList(nn.BatchNorm2d(w) for _ in range(k))
        self.consumers = nn.ModuleList(nn.Conv2d(w, c_out, 1, bias=i == 0) for i in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for p, n, c in zip(self.producers, self.norms, self.consumers, strict=True):
            t = c(torch.relu(n(p(x))))
            y = t if y is None else y + t
        return y


def measure_segment_cost(backend: Backend, config: MeasureConfig | None = None) -> SegmentCost:
    """Seconds per extra conv a segment adds, and per multiply-accumulate, on ``backend``.

    Three pairs are timed side by side at 28×28 (128 → 512 → 128): whole, as 8 segments, and
    whole at half the middle width. Eight segments add 7 producer and 7 consumer convs; the half
    width removes 256 channels' multiply-adds from both convs. The ratio of the two prices
    (how many multiply-adds one conv launch is worth) is what decides whether a segment pays;
    it depends on the runtime, the CPU and the batch size, hence the probe.
    """
    config = config or MeasureConfig(warmup=5, repeats=30, min_seconds=0.5)
    c_in, c, c_out, hw = 128, 512, 128, 28
    torch.manual_seed(0)
    units = [_Segmented(c_in, w, c_out, k).eval() for w, k in ((c, 1), (c, 8), (c // 2, 1))]
    x = torch.randn(1, c_in, hw, hw)
    with torch.no_grad():
        whole, split, half = (
            m.median_ms * 1e-3 for m in measure_side_by_side(backend, units, (x,), config, 1)
        )
    macs = (c - c // 2) * (c_in + c_out) * hw * hw
    mac_s = max(whole - half, 1e-15 * macs) / macs
    return SegmentCost(launch_s=max(split - whole, 0.0) / 14, mac_s=mac_s)
