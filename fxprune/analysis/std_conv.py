"""A conv whose weight is standardised in its forward: the canonical module of timm's
``ScaledStdConv2d`` (NF-Nets, NF-RegNets) and ``StdConv2d`` (BiT, ResNetV2), and what pruning
it means.

Each output channel ``o`` uses its weight standardised over its own fan-in
(``in / groups × kh × kw``), times a per-output gain and a constant scale (``StdConv2d`` has
neither: no gain, scale 1)::

    W'[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps) * gain[o] * scale

- pruning *output* channels removes rows of ``W`` (and ``gain``); every kept row is standardised
  over the same entries as before, so it is exact (masking equals pruning);
- pruning *input* channels removes entries of every row: the kept rows' means and variances
  change, so it is not masking. The channel rule marks the inputs *inexact* (as a LayerNorm's
  channels are), except in a depthwise conv, where an input channel is pruned with the one
  output row that reads it. The pruned module standardises over its kept fan-in and keeps the
  dense ``scale`` (a constant the model computed once from the dense fan-in).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["StdConv2d", "std_conv2d"]


def std_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    gain: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    scale: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``F.conv2d`` with the weight standardised per output channel (timm's computation); no
    gain (``None``) standardises alone, as timm's ``StdConv2d`` does."""
    affine = None if gain is None else (gain * scale).view(-1)
    w = F.batch_norm(
        weight.reshape(1, weight.shape[0], -1), None, None, weight=affine, training=True,
        momentum=0.0, eps=eps,
    ).reshape_as(weight)  # fmt: skip
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


# one call in a traced graph, which the canonicalising pass lifts onto a StdConv2d
fx.wrap("std_conv2d")


class StdConv2d(nn.Conv2d):
    """Replaces a conv on a standardised weight (:func:`std_conv2d`); ``gain`` per output, or
    ``None`` when built with ``gain=False``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        scale: float = 1.0,
        eps: float = 1e-6,
        gain: bool = True,
        **conv: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **conv)
        self.scale, self.eps = scale, eps
        self.gain: nn.Parameter | None = None
        if gain:
            self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return std_conv2d(
            x, self.weight, self.gain, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.scale, self.eps,
        )  # fmt: skip
