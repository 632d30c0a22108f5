"""Hand-written models whose forward computes sizes from shape reads of pruned channel dims
(what transformer and hybrid code looks like): token layouts, spatial reduction, head splits."""

from __future__ import annotations

import torch
from torch import nn


class Tokens(nn.Module):
    """Tokens ``B, N, C`` back to ``B, C, H, W`` with every size read off ``x.shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        _, _, H, W = y.shape
        t = self.fc(y.flatten(2).transpose(1, 2))
        B, _, C = t.shape
        return self.head(t.permute(0, 2, 1).reshape(B, C, H, W))


class SpatialReduction(nn.Module):
    """PVT v2's spatial-reduction attention, reduced to its shapes: the tokens are reshaped to
    ``B, C, H, W`` for a strided conv (``sr``, a group of its own) and back to tokens with
    ``reshape(B, C, -1)``, where ``C`` is read off the *block input*, not off ``sr``'s output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.q = nn.Linear(8, 8)
        self.sr = nn.Conv2d(8, 8, 2, stride=2)
        self.kv = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        _, _, H, W = y.shape
        t = y.flatten(2).transpose(1, 2)
        B, _, C = t.shape
        r = t.permute(0, 2, 1).reshape(B, C, H, W)
        r = self.sr(r).reshape(B, C, -1).permute(0, 2, 1)
        kv = self.kv(r)
        a = self.proj(self.q(t) * kv.mean(1, keepdim=True))
        t = t + a
        return self.head(t.transpose(1, 2).reshape(B, C, H, W))


class MultiHead(nn.Module):
    """A multi-head split ``reshape(B, N, heads, C // heads)`` of ``q``, merged back with
    ``reshape(B, N, C)`` where ``C`` is read off the block input."""

    def __init__(self, heads: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, dim)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        B, N, C = t.shape
        q = self.q(t).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        q = q.softmax(dim=2)  # over the tokens, per head and channel
        y = q.permute(0, 2, 1, 3).reshape(B, N, C)
        return self.head(t + self.proj(y))


class _Scale(nn.Module):
    """Scales its input by ``C ** -0.5``, ``C`` read off the input: a size used as a value."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * t.shape[-1] ** -0.5


class NonSizeUse(nn.Module):
    """``fc``'s channel count is used as a value (a scale), not as a size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 8)
        self.attn = _Scale()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.fc(torch.relu(self.embed(x)))))


class LinearNorm(nn.Module):
    """LeViT's linear + BatchNorm1d over the tokens: ``bn(x.flatten(0, 1)).reshape_as(x)``; and
    ``reshape_as`` of a tensor of another group (``b``'s channels shaped like ``a``'s)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.bn(y.flatten(0, 1)).reshape_as(y)
        z = self.b(x).flatten(0, 1).view_as(y)
        return self.head(torch.relu(y)) + self.head_b(z)
