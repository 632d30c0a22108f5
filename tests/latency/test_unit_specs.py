"""Measured units: specs read from the graph, modules built from specs, ORT numerics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.backends import OnnxRuntimeBackend, export_to_bytes
from fxprune.latency.unit_specs import UnitSpec, build_unit, unit_spec


def _spec(layer: nn.Module, *after: nn.Module, shape=(2, 3, 9, 9)) -> tuple[UnitSpec, nn.Module]:
    model = nn.Sequential(layer, *after).eval()
    analysis = fxprune.analyze(model, torch.randn(*shape))
    node = next(n for n in analysis.gm.graph.nodes if n.op == "call_module")
    return unit_spec(node, analysis.gm)


@pytest.mark.parametrize(
    "after",
    [
        (nn.BatchNorm2d(8), nn.ReLU()),
        (nn.BatchNorm2d(8), nn.ReLU6()),
        (nn.BatchNorm2d(8), nn.SiLU()),
        (nn.BatchNorm2d(8), nn.Hardswish()),
        (nn.GELU(),),
        (nn.LeakyReLU(0.2),),
        (),
    ],
    ids=["relu", "relu6", "silu", "hardswish", "gelu", "leaky", "bare"],
)
def test_unit_runs_on_ort_like_torch(after):
    spec, act = _spec(nn.Conv2d(3, 8, 3, stride=2, padding=1), *after)
    module, inputs = build_unit(spec, 5, 12, act)
    assert inputs[0].shape == (2, 5, 9, 9)
    backend = OnnxRuntimeBackend(provider="cpu", threads=1)
    (got,) = backend.run(export_to_bytes(module, inputs), inputs)
    with torch.no_grad():
        want = module(*inputs).numpy()
    assert got.shape == want.shape == (2, 12, 5, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_spec_records_what_changes_the_cost():
    spec, _ = _spec(nn.Conv2d(3, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1))
    assert spec.kernel == (3, 1) and spec.stride == (2, 1) and spec.padding == (1, 0)
    assert spec.input_shape == (2, 0, 9, 9)
    json.dumps(spec.key())  # the cache needs JSON
    other, _ = _spec(nn.Conv2d(3, 8, (3, 1), stride=(2, 1), padding=(1, 0)), shape=(1, 3, 9, 9))
    assert other.key() != spec.key()  # batch is part of the identity


def test_depthwise_and_grouped_counts():
    dw, _ = _spec(nn.Conv2d(8, 8, 3, groups=8), shape=(1, 8, 9, 9))
    assert dw.depthwise and dw.counts(5, 99) == (5, 5)
    module, _ = build_unit(dw, 5, 5)
    assert module[0].groups == 5
    grouped, _ = _spec(nn.Conv2d(8, 16, 3, groups=4), shape=(1, 8, 9, 9))
    assert not grouped.depthwise and grouped.groups == 4
    assert grouped.counts(5, 9) == (8, 12)


def test_depthwise_multiplier_counts_outputs():
    plain, _ = _spec(nn.Conv2d(8, 8, 3, groups=8), shape=(1, 8, 9, 9))
    dw, _ = _spec(nn.Conv2d(8, 16, 3, groups=8), shape=(1, 8, 9, 9))
    assert dw.depthwise and dw.multiplier == 2 and dw.label().startswith("conv3x3 dwx2")
    assert dw.counts(6, 6) == (3, 6) and dw.counts(5, 5) == (3, 6)  # outputs, rounded up to k
    module, (x,) = build_unit(dw, 6, 6)
    assert (module[0].in_channels, module[0].out_channels, module[0].groups) == (3, 6, 3)
    assert module(x).shape == (1, 6, 7, 7)
    assert "multiplier" not in plain.key() and dw.key()["multiplier"] == 2  # old keys kept


def test_linear_unit_keeps_leading_dims():
    spec, act = _spec(nn.Linear(16, 4), nn.ReLU(), shape=(3, 7, 16))
    assert spec.kind == "linear" and spec.input_shape == (3, 7, 0) and spec.activation == "ReLU()"
    module, (x,) = build_unit(spec, 10, 6, act)
    assert x.shape == (3, 7, 10) and module(x).shape == (3, 7, 6)


def test_label_is_readable():
    spec, _ = _spec(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6())
    assert spec.label() == "conv3x3/s2 9x9+BN+ReLU6()"
