"""Hand-written functional-style models: parameters applied with F.conv2d / F.batch_norm /
F.linear on attributes of the model itself (what ported or generated code looks like)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(model: nn.Module, name: str, cin: int, cout: int, k: int, g: torch.Generator) -> None:
    """Register the tensors of a conv + BN pair on ``model`` as ``<name>_w``, ``<name>_g``, ..."""
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    model.register_parameter(f"{name}_w", nn.Parameter(w))
    model.register_parameter(f"{name}_g", nn.Parameter(torch.rand(cout, generator=g) + 0.5))
    model.register_parameter(f"{name}_b", nn.Parameter(torch.randn(cout, generator=g) * 0.1))
    model.register_buffer(f"{name}_rm", torch.randn(cout, generator=g) * 0.1)
    model.register_buffer(f"{name}_rv", torch.rand(cout, generator=g) + 0.5)


def _apply(model: nn.Module, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = getattr(model, f"{name}_w")
    x = F.conv2d(x, w, None, stride, w.shape[-1] // 2)
    x = F.batch_norm(
        x, getattr(model, f"{name}_rm"), getattr(model, f"{name}_rv"),
        getattr(model, f"{name}_g"), getattr(model, f"{name}_b"), False, 0.1, 1e-5,
    )  # fmt: skip
    return F.relu(x)


class FunctionalResNet(nn.Module):
    """stem → two residual blocks (conv-bn-relu ×2 + identity) → pool → linear head."""

    def __init__(self, width: int = 16, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        _conv_bn(self, "stem", 3, width, 3, g)
        for i in range(2):
            _conv_bn(self, f"b{i}a", width, width * 2, 3, g)
            _conv_bn(self, f"b{i}b", width * 2, width, 1, g)
        self.fc_w = nn.Parameter(torch.randn(classes, width, generator=g) / width**0.5)
        self.fc_b = nn.Parameter(torch.randn(classes, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _apply(self, "stem", x, 2)
        for i in range(2):
            x = x + _apply(self, f"b{i}b", _apply(self, f"b{i}a", x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, self.fc_w, self.fc_b)


class FunctionalConcat(nn.Module):
    """stem → two parallel branches concatenated on channels → conv → linear, keyword args."""

    def __init__(self, classes: int = 10, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        _conv_bn(self, "stem", 3, 12, 3, g)
        _conv_bn(self, "left", 12, 8, 1, g)
        _conv_bn(self, "right", 12, 16, 3, g)
        _conv_bn(self, "fuse", 24, 20, 1, g)
        self.fc_w = nn.Parameter(torch.randn(classes, 20, generator=g) / 20**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _apply(self, "stem", x, 2)
        y = torch.cat([_apply(self, "left", x), _apply(self, "right", x)], dim=1)
        y = _apply(self, "fuse", y)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return F.linear(input=y, weight=self.fc_w)
