"""Uniform plans: the README's snippet holds on models with LayerNorm / GroupNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune


class NormedMLP(nn.Module):
    """``fc2``'s channels go through a LayerNorm: pruning them changes its mean and variance."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc2(torch.relu(self.fc1(x))))))


class GroupNormed(nn.Module):
    """``conv2``'s channels go through a GroupNorm: pruning them changes its group statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 1)
        self.norm = nn.GroupNorm(4, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        y = torch.relu(self.norm(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(y.mean((2, 3)))


CASES = [(NormedMLP, (4, 8), "fc1", "fc2"), (GroupNormed, (2, 3, 8, 8), "conv1", "conv2")]


def _analysed(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    return model, x, fxprune.analyze(model, x)


@pytest.mark.parametrize(("cls", "shape", "exact", "inexact"), CASES)
def test_readme_snippet_holds_with_norm_layers(cls, shape, exact, inexact):
    _, x, analysis = _analysed(cls, shape)
    assert analysis.group(inexact).inexact and not analysis.group(exact).inexact
    # the README's snippet, as written there
    plan = fxprune.uniform_plan(analysis, keep=0.5)
    pruned = fxprune.prune(analysis, plan)
    assert torch.allclose(pruned(x), fxprune.masked_forward(analysis, plan, x), atol=1e-4)
    # the inexact group is left whole by default; the exact one is pruned
    assert set(plan.kept) == {exact} and len(plan.kept[exact]) == analysis.group(exact).size // 2
    assert plan.notes["include_inexact"] is False


@pytest.mark.parametrize(("cls", "shape", "exact", "inexact"), CASES)
def test_include_inexact_prunes_the_norm_groups_too(cls, shape, exact, inexact):
    model, x, analysis = _analysed(cls, shape)
    plan = fxprune.uniform_plan(analysis, keep=0.5, include_inexact=True)
    assert set(plan.kept) == {exact, inexact}
    assert len(plan.kept[inexact]) == analysis.group(inexact).size // 2 == 16
    assert plan.notes["include_inexact"] is True
    pruned = fxprune.prune(analysis, plan)
    with torch.no_grad():
        got = pruned(x)
        # why it is off by default: the pruned model is no longer the masked one
        assert not torch.allclose(got, fxprune.masked_forward(analysis, plan, x), atol=1e-4)
    assert got.shape == model(x).shape
    layer = getattr(pruned, inexact)
    assert (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features) == 16
