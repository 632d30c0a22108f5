"""``fxprune.backend``: pruning inside ``torch.compile`` as a dynamo backend, then inductor.

The budget is met on the deterministic FakeBackend (fast, reproducible); what is checked is
that the compiled function computes what the pruned graph computes, that the graph handed on
is smaller, that graph breaks give one pruned graph each, and that the user's model is left
alone. Inductor compiles are slow here: the default suite compiles one small CNN with
inductor; torchvision and timm models under inductor are ``slow``.
"""

from __future__ import annotations

import copy
import logging
from importlib import import_module
from pathlib import Path

import pytest
import torch
import torchvision
from fake_backend import FakeBackend
from helpers import make_sensitive, rel_err
from torch import fx, nn

import fxprune
from fxprune import CompileConfig
from fxprune.core.errors import ConfigError
from fxprune.latency.tables import LatencyConfig
from fxprune.pipeline.dynamo_backend import (
    BACKEND_NAME,
    FxpruneBackend,
    clear_records,
    fxprune_backend,
    last_records,
    lift_parameters,
)

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path) -> CompileConfig:
    return CompileConfig(
        cache=tmp_path / "cache",
        progress=False,
        latency=LatencyConfig(progress=False, unit_timing="wall"),
    )


def _backend(tmp_path: Path, then: str = "inductor", **kw) -> FxpruneBackend:
    kw.setdefault("latency_backend", FakeBackend())
    return fxprune.backend(kw.pop("budget", 0.5), then=then, config=_config(tmp_path), **kw)


class SmallCNN(nn.Module):
    """Stem, a residual block, a widening conv and a head: prunable groups inside, output whole."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(48, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.wide = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = self.wide(x).mean((2, 3))
        return self.head(x)


class Broken(nn.Module):
    """Two CNN halves with a forced graph break between them: two captured graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 16, 1),
        )
        self.second = nn.Sequential(
            nn.Conv2d(16, 48, 3, padding=1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.Conv2d(48, 8, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        torch._dynamo.graph_break()
        return self.second(y)


def _model(cls: type[nn.Module], x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return make_sensitive(cls(), x).eval()


def _eager(record, *inputs: torch.Tensor):
    """The pruned graph's own eager output (dynamo graphs return a tuple)."""
    out = record.result.model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _conv_channels(gm: nn.Module) -> int:
    return sum(m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d))


def _compile_and_check(model: nn.Module, x: torch.Tensor, be: FxpruneBackend) -> None:
    """Compile, run, and check the output against the pruned graph's eager output."""
    state = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        got = compiled(x)
        (record,) = be.graphs
        assert record.status == "pruned", record
        want = _eager(record, x)
        dense = model(x)
    # relative to the output's scale: inductor reorders float32 reductions, so an element
    # near zero can differ from eager by more than 1e-4 of itself (seen: 2e-5 on 0.04)
    assert rel_err(got, want) < 1e-4
    assert not torch.allclose(got, dense, atol=1e-3)  # what ran is the pruned graph
    assert record.params[1] < record.params[0]
    assert _conv_channels(record.result.model) < _conv_channels(model)
    for k, v in model.state_dict().items():  # the user's model is not mutated
        assert torch.equal(v, state[k]), k


def test_lift_parameters_turns_state_placeholders_into_attributes():
    x = torch.randn(2, 3, 16, 16)
    model = _model(SmallCNN, x)
    seen = []

    def capture(gm, example_inputs):  # dynamo drops the placeholders' sources after this
        seen.append((lift_parameters(gm, example_inputs), len(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(x)
    ((lifted, n_example),) = seen
    placeholders = [n for n in lifted.gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 and lifted.inputs[0] is x
    used = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert lifted.parameters == n_example - 1 == len(used)  # eval BN never reads its count
    assert dict(lifted.gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert lifted.gm.get_buffer("stem.1.running_mean").data_ptr() != (
        model.stem[1].running_mean.data_ptr()
    )  # copies: pruning never touches the user's tensors
    with torch.no_grad():
        (out,) = lifted.gm(x)
        torch.testing.assert_close(out, model(x))
    fx.GraphModule(lifted.gm, lifted.gm.graph).graph.lint()


def test_small_cnn_under_inductor_equals_the_pruned_graph(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    model = _model(SmallCNN, x)
    _compile_and_check(model, x, _backend(tmp_path))


def test_eager_then_and_a_saved_plan(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    model = _model(SmallCNN, x)
    be = _backend(tmp_path, then="eager")
    _compile_and_check(model, x, be)
    plan_path = tmp_path / "plan.json"
    be.graphs[0].result.plan.save(plan_path)
    again = fxprune.backend(plan=str(plan_path), then="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=again)(x)
        torch.testing.assert_close(got, _eager(be.graphs[0], x), rtol=1e-5, atol=1e-6)
    (record,) = again.graphs
    assert record.status == "planned" and record.pruned


def test_graph_break_prunes_each_graph(tmp_path, caplog):
    x = torch.randn(1, 3, 32, 32)
    model = _model(Broken, x)
    be = _backend(tmp_path, then="eager", budget=0.4)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fxprune"):
        got = torch.compile(model, backend=be)(x)
        first, second = be.graphs
        mid = _eager(first, x)
        want = _eager(second, mid)
    assert [g.status for g in be.graphs] == ["pruned", "pruned"]
    assert first.pruned and second.pruned
    assert mid.shape == (1, 16, 32, 32)  # what crosses the break keeps every channel
    assert any("output" in why for why in first.frozen)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert "graph 1: pruned" in caplog.text


def test_graph_without_parameters_is_handed_on_unchanged(tmp_path):
    be = _backend(tmp_path, then="eager")
    torch._dynamo.reset()
    x = torch.randn(4, 4)
    got = torch.compile(lambda t: torch.relu(t) * 2, backend=be)(x)
    torch.testing.assert_close(got, torch.relu(x) * 2)
    (record,) = be.graphs
    assert record.status == "skipped" and "too small" in record.reason


def test_training_mode_graph_is_handed_on_unchanged(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    model = _model(SmallCNN, x).train()
    be = _backend(tmp_path, then="eager")
    torch._dynamo.reset()
    got = torch.compile(model, backend=be)(x)
    (record,) = be.graphs
    assert record.status == "skipped" and "training mode" in record.reason, record
    assert "model.eval()" in record.reason
    torch.testing.assert_close(got, copy.deepcopy(model)(x))  # batch statistics, dense


def test_dynamic_recompile_is_skipped_with_advice_and_static_shapes_prune(tmp_path):
    x1, x3 = torch.randn(1, 3, 16, 16), torch.randn(3, 3, 16, 16)
    model = _model(SmallCNN, x1)
    for dynamic, statuses in ((None, ["pruned", "skipped"]), (False, ["pruned", "pruned"])):
        be = _backend(tmp_path, then="eager")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=be, dynamic=dynamic)
        with torch.no_grad():
            compiled(x1)
            got = compiled(x3)
        assert [g.status for g in be.graphs] == statuses, be.graphs
        if dynamic is None:  # the dynamic graph runs dense, and the record says what to do
            assert "dynamic=False" in be.graphs[1].reason
            torch.testing.assert_close(got, model(x3))
        else:
            torch.testing.assert_close(got, _eager(be.graphs[1], x3), rtol=1e-4, atol=1e-5)


def test_backend_resolves_by_name(tmp_path, caplog):
    assert BACKEND_NAME in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("fxprune") is fxprune_backend
    x = torch.randn(1, 3, 32, 32)
    model = _model(SmallCNN, x)
    options = {
        "budget": 0.5,
        "then": "eager",
        "latency_backend": FakeBackend(),
        "config": _config(tmp_path),
    }
    torch._dynamo.reset()
    clear_records()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fxprune"):
        compiled = torch.compile(model, backend="fxprune", options=options)
        got = compiled(x)
        assert not torch.allclose(got, model(x), atol=1e-3)
        (record,) = last_records()  # the by-name path keeps its records in the module
        assert record.status == "pruned" and record.index == 0 and record.pruned
        torch.testing.assert_close(got, _eager(record, x), rtol=1e-4, atol=1e-5)
        # a new shape: dynamo recompiles with a symbolic batch, which runs dense, warned
        x3 = torch.randn(3, 3, 32, 32)
        got3 = compiled(x3)
        torch.testing.assert_close(got3, model(x3))
    assert "graph 0: pruned" in caplog.text
    first, second = last_records()
    assert first is record and second.index == 1 and second.status == "skipped"
    assert "runs dense" in second.reason and "dynamic=False" in second.reason
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("graph 1: skipped" in r.getMessage() for r in warned)
    last_records().clear()  # a copy: the module's records are not the caller's to edit
    assert len(last_records()) == 2
    clear_records()
    assert last_records() == []


def test_entry_point_names_the_registered_backend():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["torch_dynamo_backends"][BACKEND_NAME]
    module, _, name = target.partition(":")
    assert getattr(import_module(module), name) is fxprune_backend


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="budget or a plan"):
        fxprune.backend(None)
    with pytest.raises(ConfigError, match="then="):
        fxprune.backend(0.5, then=3)
    with pytest.raises(ConfigError, match="config="):
        fxprune.backend(0.5, config={"progress": False})
    with pytest.raises(TypeError, match="budgt"):  # a misspelt option by name
        fxprune_backend(None, [], options={"budgt": 0.5})


def _timm(name: str):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory",
    [
        torchvision.models.resnet18,
        torchvision.models.mobilenet_v2,
        pytest.param("timm:resnet18", id="timm-resnet18"),
    ],
    ids=lambda f: getattr(f, "__name__", str(f)),
)
def test_real_models_under_inductor(tmp_path, factory):
    if isinstance(factory, str):
        factory = _timm(factory.split(":")[1])
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    model = make_sensitive(factory(), x).eval()
    _compile_and_check(model, x, _backend(tmp_path))
