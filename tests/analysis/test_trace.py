"""Tracing: clear errors for untraceable models, the leaf escape hatch, no mutation."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.analysis.plans import random_plan
from fxprune.analysis.trace import trace


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_untraceable_names_the_module_and_fix():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(Net(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "'gate'" in msg and "DataDependent" in msg and "leaf_modules" in msg


def test_leaf_module_escape_hatch_freezes_its_channels():
    model = Net().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(model, x, leaf_modules=[DataDependent])
    assert not a.group("conv").prunable
    assert any("DataDependent" in r for r in a.group("conv").frozen)
    pruned = fxprune.prune(a, fxprune.Plan.empty(a))
    assert torch.equal(pruned(x), model(x))


def test_wrong_number_of_inputs():
    with pytest.raises(fxprune.TraceError, match="1 tensor input"):
        fxprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),) * 2)


def test_user_model_never_mutated():
    model = torchvision.models.mobilenet_v2().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    a = fxprune.analyze(model, x)
    fxprune.prune(a, random_plan(a, 0))
    fxprune.masked_forward(a, random_plan(a, 1), x)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("leaf_modules", [None, [DataDependent], ["gate"]])
def test_traced_module_pickles(leaf_modules):
    """A traced GraphModule (and so every rewrite of it) survives torch.save / torch.load:
    unpickling re-traces its code with the graph's tracer class, which must not need
    arguments (fxprune's own tracer is not recorded at all)."""
    model = Net().eval()
    if leaf_modules is None:  # traced all through
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1))
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, x, leaf_modules=leaf_modules)
    assert gm.graph._tracer_cls is None and gm._tracer_cls is None
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert [n.op for n in loaded.graph.nodes] == [n.op for n in gm.graph.nodes]
