"""Inductor backend: compiles a copy, times it, keys its figures apart from other runtimes,
and measures side by side; compile() meets a budget measured under inductor (slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.backends import (
    BackendUnavailable,
    InductorBackend,
    InterleavedMeasurement,
    MeasureConfig,
    TorchEagerBackend,
    get_backend,
    identity_label,
    inductor_available,
)

QUICK = MeasureConfig(warmup=1, repeats=5, max_rounds=1, max_rel_spread=10.0)


def _needs_inductor():
    why = inductor_available()
    if why is not None:
        pytest.skip(f"inductor cannot compile here ({why}); it needs a working C++ compiler")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


def test_identity_is_its_own_and_names_the_mode():
    ind = InductorBackend(threads=1, mode="max-autotune").identity()
    assert ind["runtime"] == "torch-inductor" and ind["mode"] == "max-autotune"
    assert ind["threads"] == "1" and ind["runtime_version"] == torch.__version__
    eager = TorchEagerBackend(threads=1).identity()
    assert identity_label(ind) != identity_label(eager)
    assert identity_label(InductorBackend(threads=1).identity()) != identity_label(ind)


def test_get_backend_and_bad_options():
    assert isinstance(get_backend("inductor", threads=1), InductorBackend)
    assert isinstance(InductorBackend(), InterleavedMeasurement)
    with pytest.raises(ValueError, match="mode must be one of"):
        InductorBackend(mode="fastest")
    with pytest.raises(ValueError, match="threads must be"):
        InductorBackend(threads=0)
    with pytest.raises(ValueError, match="device must be"):
        InductorBackend(device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_unavailable_says_what_to_do():
    with pytest.raises(BackendUnavailable, match="use device='cpu'"):
        InductorBackend(device="cuda")


def test_measure_compiles_a_copy_and_times_it():
    _needs_inductor()
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 16, 16)
    m = InductorBackend(threads=1).measure(net, (x,), QUICK)
    assert m.median_ms > 0 and len(m.samples) == 5 and m.backend_id
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and not hasattr(net, "_orig_mod")


def test_side_by_side_orders_a_bigger_model_slower():
    _needs_inductor()
    x = torch.randn(1, 3, 32, 32)
    small = nn.Conv2d(3, 4, 3, padding=1).eval()
    big = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 64, 64, 3, padding=1) for i in range(4)])
    cfg = MeasureConfig(warmup=1, repeats=10, max_rounds=1, max_rel_spread=10.0)
    s, b = InductorBackend(threads=1).measure_interleaved([small, big.eval()], (x,), cfg, 2)
    assert b.median_ms > s.median_ms


@pytest.mark.slow
def test_compile_meets_a_budget_measured_under_inductor(tmp_path):
    _needs_inductor()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    config = fxprune.CompileConfig(
        cache=tmp_path / "cache", progress=False, latency=fxprune.LatencyConfig(progress=False)
    )
    result = fxprune.compile(model, 0.6, example_inputs=x, backend="inductor", config=config)
    assert result.budget_ms == pytest.approx(0.6 * result.dense_ms)
    assert result.summary()["backend"].startswith("torch-inductor")
    with torch.no_grad():
        got = result.model(x)
        want = fxprune.masked_forward(result.analysis, result.plan, x)
    assert (got - want).abs().max() < 1e-4
