"""``fxprune.sweep``: many budgets from one analysis, one importance pass and one table build.

On the deterministic FakeBackend, so monotone latencies are statements about its figures, not
about this machine's speed.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torchvision
from fake_backend import FakeBackend
from helpers import make_sensitive, rel_err

import fxprune
import fxprune.pipeline.compile as compile_module
from fxprune import CompileConfig
from fxprune.core.errors import ConfigError
from fxprune.latency.tables import LatencyConfig

QUIET = LatencyConfig(progress=False, unit_timing="wall")
BUDGETS = [0.7, 0.01, 0.3, 0.5]  # unsorted on purpose; 0.01 is out of reach


class _Counting:
    """Wraps a function and records each call's keyword arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of resnet18 over BUDGETS, with the table builds, solves and evaluations counted."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = make_sensitive(torchvision.models.resnet18().eval(), x)
    probe = torch.randn(2, 3, 64, 64)
    evaluated: list[torch.nn.Module] = []

    def evaluate(m: torch.nn.Module) -> float:
        evaluated.append(m)
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(m(probe), model(probe)).mean())

    tables = _Counting(compile_module.annotate_latency)
    solves = _Counting(compile_module.solve_minlp)
    config = CompileConfig(latency=QUIET, cache=tmp_path_factory.mktemp("cache"), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_module, "annotate_latency", tables)
        mp.setattr(compile_module, "solve_minlp", solves)
        result = fxprune.sweep(
            model,
            BUDGETS,
            example_inputs=x,
            evaluate=evaluate,
            backend=FakeBackend(),
            config=config,
        )
    return result, tables, solves, evaluated


def test_points_are_sorted_and_monotone(swept):
    result, *_ = swept
    assert [p.budget.fraction for p in result.points] == sorted(BUDGETS)
    feasible = [p for p in result.points if p.feasible]
    assert len(feasible) == 3
    for a, b in itertools.pairwise(feasible):
        assert a.measured_ms < b.measured_ms and a.ratio < b.ratio
        assert a.importance_kept < b.importance_kept
        assert a.params <= b.params and a.macs <= b.macs
    for p in feasible:
        assert p.budget_met and p.measured_ms <= p.budget_ms * 1.02
        assert p.ratio == pytest.approx(p.measured_ms / p.dense_ms)
        assert p.result.budget == p.budget and p.model is p.result.model
        assert p.params == p.result.params[1] and p.macs == p.result.macs[1]
    dense = result.dense
    assert dense.ratio == 1.0 and dense.importance_kept == 1.0 and dense.feasible
    assert dense.params == feasible[0].result.params[0]


def test_each_point_is_its_masked_oracle(swept):
    result, *_ = swept
    x = torch.randn(2, 3, 64, 64)
    for p in result.points:
        if not p.feasible:
            continue
        with torch.no_grad():
            got = p.model(x)
            want = fxprune.masked_forward(p.result.analysis, p.result.plan, x)
        assert rel_err(got, want) < 1e-4


def test_one_table_build_and_warm_started_solves(swept):
    result, tables, solves, _ = swept
    assert len(tables.calls) == 1  # one latency-table build for every budget
    assert len({id(p.result.tables) for p in result.points if p.feasible}) == 1
    # the tightest feasible budget starts cold; each looser one from the previous plan
    assert solves.calls[0].get("warm_start") is None
    starts = [c["warm_start"] for c in solves.calls[1:] if c.get("warm_start") is not None]
    assert len(starts) >= 2 and all(s.status == "given" for s in starts)


def test_evaluate_is_called_once_per_feasible_point_and_on_the_dense_model(swept):
    result, _, _, evaluated = swept
    feasible = [p for p in result.points if p.feasible]
    assert len(evaluated) == len(feasible) + 1  # the dense model's reference figure too
    assert [id(m) for m in evaluated[:-1]] == [id(p.model) for p in feasible]
    assert all(isinstance(p.value, float) for p in feasible)
    assert result.dense.value == pytest.approx(1.0)
    assert all(p.value is None for p in result.points if not p.feasible)


def test_an_infeasible_budget_is_a_marked_point(swept):
    result, *_ = swept
    (bad,) = [p for p in result.points if not p.feasible]
    assert bad.budget.fraction == 0.01 and not bad.budget_met and bad.result is None
    assert bad.min_latency_ms > bad.budget_ms and bad.model is None
    assert bad.ratio == pytest.approx(bad.min_latency_ms / bad.dense_ms)
    assert bad.ratio < min(p.ratio for p in result.points if p.feasible)


def test_save_writes_loadable_json_markdown_and_a_plot(swept, tmp_path):
    result, *_ = swept
    out = result.save(tmp_path / "sweep")
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.md", "sweep.png"}
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["points"]) == len(BUDGETS) and saved["dense"]["ratio"] == 1.0
    assert [r["feasible"] for r in saved["points"]] == [p.feasible for p in result.points]
    assert saved["points"] == json.loads(json.dumps([p.to_dict() for p in result.points]))
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == len(BUDGETS) + 2  # header, dense, one row per budget
    assert result.table()[0]["point"] == "dense" and len(result.table()) == len(BUDGETS) + 1
    assert "feasible" in repr(result)


def test_sweep_under_a_parameter_limit_keeps_it_at_every_point(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = make_sensitive(torchvision.models.resnet18().eval(), x)
    dense_params = sum(p.numel() for p in model.parameters())
    limit = dense_params // 3
    config = CompileConfig(latency=QUIET, cache=tmp_path / "c", progress=False, max_params=limit)
    result = fxprune.sweep(
        model, [1.0, 0.6], example_inputs=x, backend=FakeBackend(), config=config
    )
    assert [p.budget.fraction for p in result.points] == [0.6, 1.0]
    for p in result.points:  # 1.0: the dense model meets the budget but not the limit
        assert p.feasible and p.params <= limit and p.result.limits_met
        assert not p.result.dense_meets_budget


def test_no_budgets_is_a_config_error():
    with pytest.raises(ConfigError, match="at least one"):
        fxprune.sweep(torch.nn.Linear(2, 2), [], example_inputs=torch.randn(1, 2))
