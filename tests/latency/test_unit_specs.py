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


# ---- attention units -----------------------------------------------------------------------


def test_conv_and_linear_keys_have_no_attention_fields():
    """Keys of units cached before attention units existed must not change."""
    spec, _ = _spec(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    assert set(spec.key()) == {
        "kind",
        "input_shape",
        "kernel",
        "stride",
        "padding",
        "dilation",
        "padding_mode",
        "groups",
        "depthwise",
        "bias",
        "bn",
        "activation",
    }
    linear, _ = _spec(nn.Linear(6, 4), shape=(2, 5, 6))
    assert "seq_kv" not in linear.key() and "value_dim" not in linear.key()


def _attention_spec(attention: str):
    import torch.nn.functional as F

    from fxprune.latency.unit_specs import attention_spec

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(24, 72)
            self.proj = nn.Linear(24, 24)

        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    analysis = fxprune.analyze(Attn().eval(), torch.randn(2, 5, 24), attention=attention)
    (rec,) = analysis.attention_layers
    node = next(n for n in analysis.gm.graph.nodes if n.name == rec.node)
    return attention_spec(node, rec.dim)


def test_attention_spec_and_unit_under_head_dim():
    spec = _attention_spec("head_dim")
    assert spec.kind == "attention" and spec.input_shape == (2, 3, 5, 0)
    assert spec.seq_kv == 5 and spec.value_dim == 8 and not spec.causal
    assert json.loads(json.dumps(spec.key()))["seq_kv"] == 5
    module, (q, k, v) = build_unit(spec, 4, 6)
    assert q.shape == (2, 3, 5, 4) and k.shape == (2, 3, 5, 4) and v.shape == (2, 3, 5, 6)
    assert module(q, k, v).shape == (2, 3, 5, 6)
    assert "head_dim" in spec.label()


def test_attention_spec_and_unit_under_heads():
    spec = _attention_spec("heads")
    assert spec.input_shape == (2, 0, 5, 8) and spec.value_dim == 8
    module, (q, k, v) = build_unit(spec, 2, 2)
    assert q.shape == k.shape == v.shape == (2, 2, 5, 8)
    assert module(q, k, v).shape == (2, 2, 5, 8)
    assert spec.key() != _attention_spec("head_dim").key()


def test_attention_unit_runs_on_ort_like_torch():
    spec = _attention_spec("heads")
    module, inputs = build_unit(spec, 2, 2)
    got = OnnxRuntimeBackend(provider="cpu").run(export_to_bytes(module, inputs), inputs)[0]
    want = module(*inputs).detach().numpy()
    assert np.allclose(np.asarray(got), want, atol=1e-5)


def test_the_inductor_generic_path_leaves_attention_units_to_per_shape_compiles():
    from fxprune.backends.inductor_units import supported

    module, _ = build_unit(_attention_spec("heads"), 2, 2)
    assert not supported(module)  # measure_unit falls back to measure(): no crash, one compile
