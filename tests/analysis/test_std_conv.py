"""Convs on a standardised weight (timm's ScaledStdConv2d, with a gain, and StdConv2d, without):
lifted onto ``StdConv2d``, output channels pruned exactly (equal to the oracle), input channels
inexact and re-standardised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import check_planned_shapes, check_random_plans, make_sensitive, rel_err
from torch import nn

import fxprune
from fxprune.analysis.std_conv import StdConv2d, std_conv2d

X = torch.randn(2, 3, 10, 10)


class ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d forward, written out (weight standardised by ``F.batch_norm``)."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1, gamma: float = 1.7):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = 1e-6
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainStdConv(nn.Conv2d):
    """timm's StdConv2d forward, written out: standardised, no gain, no scale."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups)
        self.eps = 1e-5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
            momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _timm_scaled(cin: int, cout: int, k: int, groups: int = 1) -> nn.Module:
    timm_layers = pytest.importorskip("timm.layers")
    conv = timm_layers.ScaledStdConv2d(cin, cout, k, groups=groups, gamma=1.7)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    return conv


def _timm_plain(cin: int, cout: int, k: int, groups: int = 1) -> nn.Module:
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.StdConv2d(cin, cout, k, groups=groups, bias=cin != 3)  # bias and none


CONVS = [ScaledStdConv, _timm_scaled, PlainStdConv, _timm_plain]
CONV_IDS = ["scaled_written_out", "scaled_timm", "plain_written_out", "plain_timm"]


class StdNet(nn.Module):
    """std conv → plain conv → std 1×1 → std depthwise → pool → linear."""

    def __init__(self, conv=ScaledStdConv):
        super().__init__()
        self.c = conv(3, 8, 3)
        self.e = nn.Conv2d(8, 8, 3, padding=1)
        self.d = conv(8, 6, 1)
        self.dw = conv(6, 6, 3, groups=6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.e(F.relu(self.c(x))))
        return self.fc(F.relu(self.dw(F.relu(self.d(x)))).mean((2, 3)))


def _analysis(frontend: str, conv=ScaledStdConv):
    torch.manual_seed(0)
    model = make_sensitive(StdNet(conv).eval(), X)
    return model, fxprune.analyze(model, X, frontend=frontend)


@pytest.mark.parametrize("conv", CONVS, ids=CONV_IDS)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_standardised_conv_is_lifted_and_equal(frontend, conv):
    model, a = _analysis(frontend, conv)
    lifted = {p: m for p, m in a.gm.named_modules() if isinstance(m, StdConv2d)}
    assert sorted(lifted) == ["c", "d", "dw"]
    for path, m in lifted.items():  # the model's tensors, on the canonical module
        dense = model.get_submodule(path)
        for name in ("weight", "gain", "bias"):
            if getattr(dense, name, None) is None:
                assert getattr(m, name) is None
            else:
                assert torch.equal(getattr(m, name), getattr(dense, name))
        assert m.scale == getattr(dense, "scale", 1.0) and m.eps == dense.eps
    assert not any(n.target in (F.batch_norm, torch.batch_norm) for n in a.gm.graph.nodes)
    assert set(a.gm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(a.gm(X), model(X))


@pytest.mark.parametrize("conv", [ScaledStdConv, PlainStdConv], ids=["scaled", "plain"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_output_channels_prune_exactly_and_inputs_are_inexact(frontend, conv):
    _, a = _analysis(frontend, conv)
    exact = {g.name: g.size for g in a.groups if g.prunable and not g.inexact}
    assert exact == {"c": 8, "d": 6}  # c feeds a plain conv; d a depthwise std conv
    (why,) = a.group("e").inexact  # e feeds d's standardised fan-in
    assert a.group("e").prunable and "'d'" in why and "standardises its weight" in why
    assert "d" not in a.consumers and "e" in a.consumers  # no own input columns for a std conv
    check_random_plans(a, X)  # c and d, the depthwise std conv with them: equal to the oracle


@pytest.mark.parametrize("conv", [ScaledStdConv, PlainStdConv], ids=["scaled", "plain"])
def test_input_channel_pruning_restandardises_over_the_kept_fan_in(conv):
    model, a = _analysis("fx", conv)
    kept = np.array([0, 2, 3, 7])
    plan = fxprune.Plan({"e": kept, "d": np.array([1, 4, 5])}, (), a.signature)
    pruned = fxprune.prune(a, plan)
    check_planned_shapes(a, plan, pruned)
    d, dense = pruned.get_submodule("d"), model.d
    assert isinstance(d, StdConv2d) and (d.in_channels, d.out_channels) == (4, 3)
    rows, cols = torch.tensor([1, 4, 5]), torch.from_numpy(kept)
    gain, scale = getattr(dense, "gain", None), getattr(dense, "scale", 1.0)
    if gain is None:
        assert d.gain is None
    else:
        assert tuple(d.gain.shape) == (3, 1, 1, 1)
        gain = gain[rows]
    assert d.scale == scale
    y = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        w, b = dense.weight[rows][:, cols], dense.bias[rows]
        want = std_conv2d(y[:, cols], w, gain, b, scale=scale, eps=dense.eps)
        assert torch.allclose(d(y[:, cols]), want, atol=1e-6)
        # not masking: the dense rows standardised over all eight inputs differ
        masked = y * torch.isin(torch.arange(8), cols).view(1, 8, 1, 1).float()
        assert rel_err(d(y[:, cols]), dense(masked)[:, rows]) > 1e-3
        assert pruned(X).shape == (2, 4)


class Read(nn.Module):
    """A standardised conv whose weight is also read elsewhere: not collapsed, it freezes."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.std = PlainStdConv(8, 8, 3)
        self.f = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.std(F.relu(self.c(x)))
        return self.f(y * self.std.weight.mean())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_standardised_weight_read_elsewhere_stays_frozen_and_named(frontend):
    torch.manual_seed(0)
    model = Read().eval()
    a = fxprune.analyze(model, X, frontend=frontend)
    assert not any(isinstance(m, StdConv2d) for m in a.gm.modules())
    (why,) = a.group("c").frozen  # c feeds the conv on a computed weight, an unknown op
    assert "conv2d" in why and "(in 'std')" in why and "'weight' of conv2d is computed" in why
    assert not any(g.prunable for g in a.groups)
    with torch.no_grad():
        assert torch.equal(a.gm(X), model(X))
