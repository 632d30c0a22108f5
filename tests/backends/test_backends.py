"""Backends: ONNX export numerics, measurement records, identities, unavailable devices.

No assertion here depends on how fast anything runs: the timing loop is tested with a
scripted clock, and real measurements only for the shape and sanity of the record.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxprune.backends.base as base
from fxprune.backends import (
    Backend,
    BackendUnavailable,
    MeasureConfig,
    Measurement,
    OnnxRuntimeBackend,
    TorchEagerBackend,
    UnstableMeasurementWarning,
    export_to_bytes,
    get_backend,
    relative_latency,
    time_callable,
)

QUICK = MeasureConfig(warmup=1, repeats=5, max_rel_spread=100.0, max_rounds=1)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def conv_bn_relu(cin: int = 3, cout: int = 8, bias: bool = True, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():  # non-trivial statistics, so a wrong BN fold would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias, groups=groups), bn, nn.ReLU()
    )


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x) + y, x.sum(dim=1)


@pytest.fixture(scope="module")
def ort_cpu() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(provider="cpu", threads=1)


# ----------------------------------------------------------------------------- ONNX export


@pytest.mark.parametrize(
    ("cin", "cout", "bias", "groups"), [(3, 8, True, 1), (4, 8, False, 1), (8, 8, True, 2)]
)
def test_ort_export_matches_torch(
    ort_cpu: OnnxRuntimeBackend, cin: int, cout: int, bias: bool, groups: int
) -> None:
    module = conv_bn_relu(cin, cout, bias, groups)
    x = torch.randn(2, cin, 12, 12)
    onnx_bytes = export_to_bytes(module, (x,))

    graph = onnx.load_from_string(onnx_bytes).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops  # folded into the conv by constant folding
    assert ops.count("Conv") == 1
    assert [i.name for i in graph.input] == ["input_0"]

    (got,) = ort_cpu.run(onnx_bytes, (x,))
    with torch.no_grad():
        want = module.eval()(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ort_export_two_inputs_two_outputs(ort_cpu: OnnxRuntimeBackend) -> None:
    module = TwoInputs()
    x, y = torch.randn(3, 16), torch.randn(3, 4)
    outs = ort_cpu.run(export_to_bytes(module, (x, y)), (x, y.numpy()))
    with torch.no_grad():
        want = module(x, y)
    assert len(outs) == 2
    for got, w in zip(outs, want, strict=True):
        np.testing.assert_allclose(got, w.numpy(), rtol=1e-5, atol=1e-6)


def test_export_restores_training_flags() -> None:
    module = conv_bn_relu().train()
    module[1].eval()  # a mixed state must come back exactly
    export_to_bytes(module, (torch.randn(1, 3, 8, 8),))
    assert [m.training for m in module.modules()] == [True, True, False, True]


def test_rejects_non_float32_inputs() -> None:
    with pytest.raises(ValueError, match="float32"):
        export_to_bytes(conv_bn_relu().double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),))
    with pytest.raises(TypeError, match="tuple"):
        export_to_bytes(conv_bn_relu(), torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- measurement


def _check_record(m: Measurement, backend: Backend) -> None:
    assert isinstance(m, Measurement)
    assert m.median_ms > 0
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.rel_spread == pytest.approx((m.p90_ms - m.p10_ms) / m.median_ms)
    assert len(m.samples) == QUICK.repeats
    assert all(s > 0 for s in m.samples)
    assert m.stable  # the spread limit is deliberately loose here
    assert m.backend_id.startswith(backend.identity()["runtime"])
    assert Measurement.from_dict(m.to_dict()) == m


def test_ort_measure(ort_cpu: OnnxRuntimeBackend) -> None:
    module = conv_bn_relu().train()
    _check_record(ort_cpu.measure(module, (torch.randn(1, 3, 16, 16),), QUICK), ort_cpu)
    assert module.training  # measured in eval mode, handed back as it came


def test_torch_measure() -> None:
    backend = TorchEagerBackend(threads=1)
    threads_before = torch.get_num_threads()
    module = conv_bn_relu().train()
    _check_record(backend.measure(module, (torch.randn(1, 3, 16, 16),), QUICK), backend)
    assert module.training
    assert torch.get_num_threads() == threads_before


def test_identity_fields(ort_cpu: OnnxRuntimeBackend) -> None:
    common = {"runtime", "runtime_version", "device", "dtype", "cpu_model", "cpu_isa"}
    ort_id = ort_cpu.identity()
    assert common | {
        "provider",
        "intra_op_threads",
        "inter_op_threads",
        "execution_mode",
        "graph_optimization_level",
        "exporter",
    } <= set(ort_id)
    assert ort_id["provider"] == "CPUExecutionProvider"
    assert ort_id["intra_op_threads"] == "1"
    assert ort_id["graph_optimization_level"] == "all"
    torch_id = TorchEagerBackend(threads=1).identity()
    assert common | {"threads"} <= set(torch_id)
    assert torch_id["threads"] == "1"
    for ident in (ort_id, torch_id):
        assert all(isinstance(v, str) and v for v in ident.values())
    assert ort_cpu.identity() == ort_id  # deterministic
    assert OnnxRuntimeBackend("cpu", threads=2).identity() != ort_id
    assert OnnxRuntimeBackend("cpu", 1, "basic").identity() != ort_id


def test_session_options_are_explicit(ort_cpu: OnnxRuntimeBackend) -> None:
    so = ort_cpu.session_options()
    assert so.intra_op_num_threads == 1
    assert so.inter_op_num_threads == 1
    assert OnnxRuntimeBackend("cpu").threads >= 1  # None resolves to a number


def test_layout_block_is_where_the_optimizer_blocks_channels(ort_cpu: OnnxRuntimeBackend) -> None:
    block = ort_cpu.layout_block()
    assert block in (1, 4, 8, 16, 32, 64)
    assert ort_cpu.layout_block() == block  # cached
    if block > 1:  # a block-wide conv runs blocked; half a block does not
        for c, blocked in ((block, True), (block // 2, False)):
            conv = nn.Conv2d(c, c, 1).eval()
            ops = ort_cpu.optimized_ops(export_to_bytes(conv, (torch.zeros(1, c, 8, 8),)))
            assert ("ReorderInput" in ops) == blocked, (c, ops)
    basic = OnnxRuntimeBackend(provider="cpu", graph_optimization_level="basic")
    assert basic.layout_block() == 1  # no layout transformer at this level


def test_get_backend() -> None:
    for name in ("onnxruntime", "ort", "ORT"):
        backend = get_backend(name, provider="cpu", threads=1)
        assert isinstance(backend, OnnxRuntimeBackend)
        assert isinstance(backend, Backend)
    torch_backend = get_backend("torch", device="cpu")
    assert isinstance(torch_backend, TorchEagerBackend)
    assert isinstance(torch_backend, Backend)
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("tensorrt")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"provider": "tpu"}, "provider"),
        ({"graph_optimization_level": "max"}, "graph_optimization_level"),
        ({"threads": 0}, "threads"),
    ],
)
def test_ort_bad_options(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        OnnxRuntimeBackend(**kwargs)


def test_auto_provider_is_cpu_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert OnnxRuntimeBackend("auto").provider == "CPUExecutionProvider"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_unavailable_raises() -> None:
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        OnnxRuntimeBackend(provider="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA device"):
        TorchEagerBackend(device="cuda")
    with pytest.raises(BackendUnavailable):
        get_backend("torch", device="cuda:0")


@pytest.mark.cuda
@needs_cuda
def test_torch_cuda_measure() -> None:  # pragma: no cover - needs a GPU
    backend = TorchEagerBackend(device="cuda")
    module = conv_bn_relu()
    m = backend.measure(module, (torch.randn(1, 3, 16, 16),), QUICK)
    assert m.median_ms > 0
    assert next(module.parameters()).device.type == "cpu"  # the caller's module is untouched
    assert backend.identity()["device"].startswith("cuda:")


# -------------------------------------------------------------------- the shared timing loop


def _scripted_clock(durations_ms: list[float]):
    """A clock whose successive (start, stop) pairs are ``durations_ms`` apart."""
    ticks: list[int] = []
    now = 0
    for d in durations_ms:
        ticks += [now, now + round(d * 1e6)]
        now += 10**9
    it = iter(ticks)
    return lambda: next(it)


def test_time_callable_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_clock", _scripted_clock([1.0, 1.01, 0.99, 1.0, 1.02]))
    calls = []
    config = MeasureConfig(warmup=2, repeats=5, max_rel_spread=0.1, max_rounds=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = time_callable(lambda: calls.append(1), config, backend_id="fake")
    assert m.stable
    assert m.median_ms == pytest.approx(1.0)
    assert m.samples == pytest.approx((1.0, 1.01, 0.99, 1.0, 1.02))
    assert len(calls) == 2 + 5  # one round: warm-up plus repeats
    assert m.backend_id == "fake"


def test_time_callable_remeasures_then_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    noisy, quiet = [1.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.01, 2.0]
    monkeypatch.setattr(base, "_clock", _scripted_clock(noisy + quiet))
    config = MeasureConfig(warmup=0, repeats=4, max_rel_spread=0.1, max_rounds=3)
    m = time_callable(lambda: None, config, backend_id="fake")
    assert m.stable
    assert m.samples == pytest.approx(tuple(quiet))


def test_time_callable_unstable_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = [[1.0, 2.0, 3.0], [1.0, 1.5, 2.0], [1.0, 4.0, 9.0]]
    monkeypatch.setattr(base, "_clock", _scripted_clock([d for r in rounds for d in r]))
    config = MeasureConfig(warmup=0, repeats=3, max_rel_spread=0.05, max_rounds=3)
    with pytest.warns(UnstableMeasurementWarning, match=r"unstable.*stable=False"):
        m = time_callable(lambda: None, config, backend_id="fake", label="unit")
    assert not m.stable
    assert m.samples == pytest.approx((1.0, 1.5, 2.0))  # the quietest round is reported
    assert m.rel_spread > config.max_rel_spread


def test_time_callable_syncs_around_each_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_clock", _scripted_clock([1.0] * 3))
    events: list[str] = []
    config = MeasureConfig(warmup=1, repeats=3, max_rounds=1)
    time_callable(
        lambda: events.append("run"), config, backend_id="fake", sync=lambda: events.append("sync")
    )
    assert events == ["run", "sync"] + ["run", "sync"] * 3


def test_time_interleaved_records_rounds_and_pairs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # two models, three alternation rounds of two timed runs each; the host slows 4× in the
    # second round and 2× in the third, alike for both models
    drift = [1.0, 4.0, 2.0]
    durations = [d * base_ms for d in drift for base_ms in (1.0, 1.0, 2.0, 2.0)]
    monkeypatch.setattr(base, "_clock", _scripted_clock(durations))
    runs = [0, 0]
    fns = [[lambda: runs.__setitem__(0, runs[0] + 1)], [lambda: runs.__setitem__(1, runs[1] + 1)]]
    config = MeasureConfig(warmup=1, repeats=6, max_rounds=1)
    a, b = base.time_interleaved(fns, config, backend_id="fake", burst=2)
    assert runs == [1 + 3 * (1 + 2)] * 2  # warm-up, then per round one untimed + two timed
    assert a.round_ms == pytest.approx((1.0, 4.0, 2.0))
    assert b.round_ms == pytest.approx((2.0, 8.0, 4.0))
    assert relative_latency(a, b) == pytest.approx(0.5)
    assert Measurement.from_dict(a.to_dict()) == a


def test_relative_latency_is_the_median_of_paired_ratios() -> None:
    def m(rounds: tuple[float, ...], median: float) -> Measurement:
        return Measurement(median, median, median, 0.0, rounds, True, "fake", round_ms=rounds)

    # the reference was hit by interference in one round only: the paired median ignores it
    pruned, dense = m((1.0, 1.0, 2.0), 1.0), m((2.0, 2.0, 6.0), 2.0)
    assert relative_latency(pruned, dense) == pytest.approx(0.5)
    # without common rounds it falls back to the ratio of the medians
    plain = Measurement(3.0, 3.0, 3.0, 0.0, (3.0,), True, "fake")
    assert relative_latency(plain, dense) == pytest.approx(1.5)
    old = {k: v for k, v in plain.to_dict().items() if k != "round_ms"}  # written before round_ms
    assert Measurement.from_dict(old) == plain


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup": -1}, {"repeats": 0}, {"max_rel_spread": 0.0}, {"max_rounds": 0}],
)
def test_measure_config_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MeasureConfig(**kwargs)
