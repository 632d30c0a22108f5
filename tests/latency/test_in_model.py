"""In-model layer scales: kernels matched to layers by shape, factors, and the predictor's use."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fake_backend import FakeBackend

import fxprune
from fxprune.backends import LatencyCache
from fxprune.core.meta import TENSOR_META
from fxprune.latency.in_model import in_model_factors, match_kernels
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.tables import LatencyConfig, annotate_latency


def _kernels(analysis, layers, pad: int = 0):
    """Profile-like records for ``layers``: NCHWc-padded channels, a ReLU kernel after each."""
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    out = []
    for i, name in enumerate(layers):
        node = nodes[name]
        module = analysis.gm.get_submodule(str(node.target))
        shape = list(node.meta[TENSOR_META].shape)
        if isinstance(module, torch.nn.Linear):
            out.append({"op": "Gemm", "output_shape": [shape], "input_shapes": [], "median_ms": i})
            continue
        padded = [shape[0], shape[1] + pad, *shape[2:]]
        weight = [shape[1], 1, *module.kernel_size]
        out.append(
            {"op": "Conv", "output_shape": [padded], "input_shapes": [[], weight], "median_ms": i}
        )
        out.append({"op": "Relu", "output_shape": [padded], "input_shapes": [], "median_ms": 0.5})
    return out


def test_kernels_match_layers_by_shape():
    model = torchvision.models.resnet18().eval()
    analysis = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    layers = [r.node for r in analysis.spaces.layers if r.kind in ("conv", "linear")]
    kernels = _kernels(analysis, layers, pad=3)
    # in graph order every layer gets its own kernel, plus the activation right after it
    times = match_kernels(analysis, layers, kernels)
    assert times == {
        name: (i + 0.5 if name != layers[-1] else float(i)) for i, name in enumerate(layers)
    }
    # in another execution order, each layer still gets a kernel of its own shape
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    shape = {name: tuple(nodes[name].meta[TENSOR_META].shape) for name in layers}
    convs = [k for k in kernels if k["op"] != "Relu"]
    times = match_kernels(analysis, layers, list(reversed(convs)))
    assert set(times) == set(layers)
    for name, t in times.items():
        assert shape[layers[int(t)]] == shape[name]


def test_unmatched_shapes_are_left_out():
    model = torchvision.models.resnet18().eval()
    analysis = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    layers = [r.node for r in analysis.spaces.layers if r.kind in ("conv", "linear")]
    kernels = _kernels(analysis, layers, pad=40)  # too much padding to be the same layer
    times = match_kernels(analysis, layers, kernels)
    assert set(times) == {layers[-1]}  # only the Gemm (fc) matches


def test_scales_keep_the_dense_prediction(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(model, x)
    tables = annotate_latency(
        analysis,
        FakeBackend(),
        cache=LatencyCache(tmp_path),
        config=LatencyConfig(progress=False, unit_timing="wall"),
    )
    assert in_model_factors(analysis, tables, FakeBackend()) == {}  # no profiler: no scales
    lm = LatencyModel(analysis, tables)
    factors = {name: 2.0 for name in list(tables.layers)[:5]}
    lm.set_scales(factors)
    dense = fxprune.Plan.empty(analysis)
    assert lm.predict(dense) == pytest.approx(tables.dense_ms)
    plan = fxprune.uniform_plan(analysis, 0.5)
    name = next(iter(factors))
    unscaled = LatencyModel(analysis, tables).layer_costs(plan)[name]
    assert lm.layer_costs(plan)[name] == pytest.approx(2.0 * unscaled)
