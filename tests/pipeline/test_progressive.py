"""``compile_progressively``: several prune–fine-tune steps whose measured ratios multiply to
the budget; the last step's model is its masked input; bad budgets fail before any work."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from fake_backend import FakeBackend
from helpers import make_sensitive, rel_err
from torch import nn

import fxprune
from fxprune import CompileConfig, FinetuneConfig
from fxprune.core.errors import ConfigError
from fxprune.latency.tables import LatencyConfig
from fxprune.pipeline.progressive import ProgressiveConfig, compile_progressively


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(2)
    ]


def test_two_steps_reach_the_budget_and_the_last_is_its_masked_input(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = make_sensitive(torchvision.models.resnet18(num_classes=10).eval(), x)
    before = copy.deepcopy(model.state_dict())
    config = CompileConfig(
        cache=tmp_path / "cache",
        progress=False,
        latency=LatencyConfig(progress=False, unit_timing="wall"),
    )
    schedule = ProgressiveConfig(steps=2, finetune=FinetuneConfig(epochs=1, progress=False))
    result = compile_progressively(
        model, 0.4, example_inputs=x, data=_data(), backend=FakeBackend(), config=config,
        schedule=schedule,
    )  # fmt: skip
    assert len(result.steps) == 2 and len(result.finetuning) == 1
    assert result.targets == pytest.approx((0.4**0.5, 0.4))
    first, last = result.steps
    assert first.importance_method == last.importance_method == "taylor"
    # each step met its own budget; the product of the measured ratios meets the final one
    assert all(r.budget_met for r in result.steps)
    assert result.ratio <= 0.4 * 1.02
    assert last.budget_ms / last.dense_ms == pytest.approx(
        0.4 / (first.measured_ms / first.dense_ms)
    )
    # the second step pruned the fine-tuned first one further
    assert last.params[0] == first.params[1] and last.params[1] < last.params[0]
    assert result.finetuning[0].steps == 2
    xb = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = result.model(xb)
        want = fxprune.masked_forward(last.analysis, last.plan, xb)
    # the last step's BatchNorms were re-estimated on the data: compare its plain rewrite
    plain = fxprune.prune(last.analysis, last.plan)
    assert rel_err(plain(xb), want) < 1e-4 and got.shape == want.shape
    summary = result.summary()
    assert summary["schedule"] == "progressive, 2 steps" and len(summary["steps"]) == 2
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, "10ms", True])
def test_budget_must_be_a_fraction(budget):
    with pytest.raises(ConfigError, match="fraction of the dense latency"):
        compile_progressively(nn.Linear(2, 2), budget, example_inputs=torch.randn(1, 2), data=[])


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("steps", 1.5), ("finetune", {})])
def test_bad_schedule_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"ProgressiveConfig.{field} must be"):
        ProgressiveConfig(**{field: value})
