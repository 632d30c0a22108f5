"""Shape-generic unit compiles under inductor: one compile per kind of unit, the same numbers as
eager, latency tables that compile per kind (not per channel count) and round-trip the cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxprune
from fxprune.backends import InductorBackend, LatencyCache, MeasureConfig, inductor_available
from fxprune.backends.inductor_units import (
    family_key,
    mark_input,
    supported,
    unit_function,
    unit_state,
)
from fxprune.latency.tables import LatencyConfig, annotate_latency
from fxprune.latency.unit_specs import UnitSpec, build_unit

# never "unstable" (an unstable cache entry is measured again: the warm run must find all)
QUICK = MeasureConfig(warmup=1, repeats=3, max_rounds=1, max_rel_spread=1e9)
CONV = UnitSpec(
    "conv", (1, 0, 12, 12), (3, 3), (1, 1), (1, 1), (1, 1), bn=True, activation="ReLU()"
)
DW = UnitSpec(
    "conv", (1, 0, 12, 12), (3, 3), (2, 2), (1, 1), (1, 1), depthwise=True, bn=True,
    activation="ReLU6()",
)  # fmt: skip
LINEAR = UnitSpec("linear", (1, 0), bias=True)
ACTS = {CONV: nn.ReLU(), DW: nn.ReLU6(), LINEAR: None}
COUNTS = [(8, 16), (16, 16), (24, 40)]


def _needs_inductor():
    why = inductor_available()
    if why is not None:
        pytest.skip(f"inductor cannot compile here ({why}); it needs a working C++ compiler")


def _unit(spec, cin, cout):
    return build_unit(spec, cin, cout, ACTS.get(spec, nn.ReLU()))


def test_family_key_ignores_channel_counts_only():
    a, _ = _unit(CONV, 8, 16)
    b, _ = _unit(CONV, 24, 40)
    assert family_key(a) == family_key(b)
    assert family_key(_unit(DW, 8, 8)[0]) == family_key(_unit(DW, 32, 32)[0])
    strided = UnitSpec("conv", (1, 0, 12, 12), (3, 3), (2, 2), (1, 1), (1, 1), bn=True,
                       activation="ReLU()")  # fmt: skip
    assert family_key(_unit(strided, 8, 16)[0]) != family_key(a)
    no_act = UnitSpec("conv", (1, 0, 12, 12), (3, 3), (1, 1), (1, 1), (1, 1), bn=True)
    assert family_key(build_unit(no_act, 8, 16)[0]) != family_key(a)


def test_supported_units():
    assert supported(_unit(CONV, 8, 16)[0]) and supported(_unit(LINEAR, 8, 16)[0])
    assert not supported(nn.Conv2d(3, 8, 3))  # not a unit
    assert not supported(nn.Sequential(nn.Conv2d(3, 8, 3, padding="same")))
    assert not supported(nn.Sequential(nn.Conv2d(3, 8, 3, padding_mode="reflect")))
    assert not supported(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)))


@pytest.mark.parametrize("spec", [CONV, DW, LINEAR], ids=["conv-bn-relu", "dw-s2", "linear"])
def test_one_compile_serves_every_channel_count(spec):
    _needs_inductor()
    torch._dynamo.reset()
    backend = InductorBackend(threads=1)
    for cin, cout in COUNTS:
        module, inputs = _unit(spec, cin, cout)
        m = backend.measure_unit(module, inputs, QUICK)
        assert m.median_ms > 0 and math.isfinite(m.median_ms)
    # a static compile per count would be len(COUNTS); inductor's linear decomposition
    # guards on out_features <= 16 once, hence 2 there
    assert backend.unit_compiles == (2 if spec is LINEAR else 1)


@pytest.mark.parametrize("spec", [CONV, DW, LINEAR], ids=["conv-bn-relu", "dw-s2", "linear"])
def test_the_generic_unit_computes_what_the_module_does(spec):
    _needs_inductor()
    torch._dynamo.reset()
    template, _ = _unit(spec, *COUNTS[0])
    compiled = torch.compile(unit_function(template, "unit_under_test"), backend="inductor")
    for cin, cout in COUNTS:
        module, (x,) = _unit(spec, cin, cout)
        with torch.inference_mode():
            got = compiled(unit_state(module), mark_input(module, x))
            want = module(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()  # fmt: skip


@pytest.mark.slow
def test_inductor_tables_compile_per_kind_and_round_trip_the_cache(tmp_path):
    _needs_inductor()
    torch._dynamo.reset()
    analysis = fxprune.analyze(_net(), torch.randn(1, 3, 12, 12))
    config = LatencyConfig(
        sweep_halfwidth=3, max_candidates=4, measured_per_axis=2, measured_per_vector=3,
        sweep_measure=QUICK, grid_measure=QUICK, whole_measure=QUICK, progress=False,
    )  # fmt: skip
    backend = InductorBackend(threads=1)
    cold = annotate_latency(analysis, backend, cache=LatencyCache(tmp_path), config=config)
    assert cold.notes["unit_timing"] == "generic"
    # three kinds of unit (3x3 conv+BN+ReLU at 12x12 from 3, from 16/24 channels share one
    # kind; the linear), many counts each: compiles follow the kinds, not the counts
    units = cold.measured - 1  # the dense model is compiled on its own
    assert units >= 20 and backend.unit_compiles <= 6
    for lat in cold.layers.values():
        values = [v for row in lat.table for v in row]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert lat.full_ms >= 0.5 * min(values)  # the full width is never far cheaper
    warm_backend = InductorBackend(threads=1)
    warm = annotate_latency(analysis, warm_backend, cache=LatencyCache(tmp_path), config=config)
    assert warm.measured == 0 and warm_backend.unit_compiles == 0
    assert {n: t.table for n, t in warm.layers.items()} == {
        n: t.table for n, t in cold.layers.items()
    }
