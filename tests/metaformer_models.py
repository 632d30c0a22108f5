"""timm's MetaFormer / PoolFormer v2 pieces in small: StarReLU (``s * relu(x) ** 2 + b``), a
scale-only GroupNorm with one group applied by its own forward, and every form of ``pow``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias`` with one learnable scalar each (timm's StarReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 0.8))
        self.bias = nn.Parameter(torch.full((1,), -0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


class GroupNorm1NoBias(nn.GroupNorm):
    """One group, a weight and no bias, through ``F.group_norm`` (timm's GroupNorm1NoBias)."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels, eps=1e-6)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PoolFormerBlock(nn.Module):
    """norm → pool - x → layer scale → residual; norm → 1×1 → StarReLU → 1×1 → residual."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = GroupNorm1NoBias(dim), GroupNorm1NoBias(dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ls1 = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.fc1, self.act, self.fc2 = (
            nn.Conv2d(dim, hidden, 1),
            StarReLU(),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.ls1 * (self.pool(y) - y)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class PoolFormerNet(nn.Module):
    """stem → two PoolFormer blocks → norm → pool → linear head."""

    def __init__(self, dim: int = 8, hidden: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, stride=4, padding=1)
        self.blocks = nn.Sequential(PoolFormerBlock(dim, hidden), PoolFormerBlock(dim, hidden))
        self.norm = GroupNorm1NoBias(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean((2, 3)))


class PowForms(nn.Module):
    """``x ** 2``, ``x.pow(3)``, ``torch.pow(x, 0.5)``, ``2 ** x``, ``x ** y``, ``torch.square``
    on conv outputs, and ``C ** -0.5`` on a channel count (a size used as a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 8, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.e = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.a(x)))
        b = torch.sigmoid(self.b(a)) ** torch.sigmoid(a)  # tensor ** tensor ties a and b
        c = self.c(a**2 + b.pow(3) + torch.pow(a, 0.5))
        d = self.d(2**c + torch.square(c))
        return self.e(d * d.shape[1] ** -0.5)  # d's channels: a size used as a value
