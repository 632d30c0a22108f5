"""Peak activation memory as solver rows (``pipeline/memory.py``) on a small residual net.

The solver's plan under ``max_activation_bytes`` is brute force's optimum, keeps within the
limit as counted on the pruned model (the rows are exact, removed blocks included), and an
unreachable limit names itself and the smallest peak any plan reaches.
"""

from __future__ import annotations

import pytest
import torch
from fake_backend import FakeBackend
from helpers import check_plan, make_sensitive
from torch import nn

import fxprune
from fxprune.analysis.importance import magnitude_scores
from fxprune.analysis.liveness import peak_activation_bytes
from fxprune.backends import LatencyCache
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.tables import LatencyConfig, annotate_latency
from fxprune.pipeline.problem import build_problem
from fxprune.solver import (
    InfeasibleLimit,
    Solution,
    brute_force,
    evaluate,
    every_choice,
    solve_minlp,
    usage,
)

QUIET = LatencyConfig(progress=False, unit_timing="wall")


class TwoBlocks(nn.Module):
    """A stem and two residual blocks (conv-BN-ReLU-conv-BN each), then a 1×1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(16, 24, 3, padding=1),
                nn.BatchNorm2d(24),
                nn.ReLU(),
                nn.Conv2d(24, 16, 1),
                nn.BatchNorm2d(16),
            )
            for _ in range(2)
        )
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x)


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    analysis = fxprune.analyze(make_sensitive(TwoBlocks().eval(), x), x)
    cache = LatencyCache(tmp_path_factory.mktemp("cache"))
    tables = annotate_latency(analysis, FakeBackend(period=4), cache=cache, config=QUIET)
    return analysis, LatencyModel(analysis, tables), x


def _problem(priced, limit: int):
    analysis, latency, _ = priced
    return build_problem(
        analysis, latency, magnitude_scores(analysis), max_activation_bytes=int(limit)
    )


@pytest.mark.parametrize(("frac", "removes"), [(0.85, False), (0.6, False), (0.3, True)])
def test_plan_meets_the_peak_limit_optimally_and_counts_as_predicted(priced, frac, removes):
    analysis, _, x = priced
    dense = peak_activation_bytes(analysis.gm)
    limit = int(frac * dense)
    pp = _problem(priced, limit)
    assert len(pp.problem.groups) >= 3 and len(pp.problem.blocks) == 2
    full = {n: len(pp.problem.group(n).counts) - 1 for n in pp.group_names}
    budget = 10 * evaluate(pp.problem, full, set())[1]  # latency does not bind
    want = brute_force(pp.problem, budget)
    got = solve_minlp(pp.problem, budget, gap=0.0)
    assert got.objective == pytest.approx(want.objective, rel=1e-9)
    assert got.objective < 1.0  # the limit binds
    assert bool(got.removed) == removes  # at 0.3 only plans without the blocks fit
    plan = pp.plan(got)
    pruned = check_plan(analysis, plan, x)  # structure and numerics against the oracle
    counted = peak_activation_bytes(pruned)
    assert counted == pytest.approx(got.resources["activation_bytes"], rel=1e-12)
    assert counted <= limit


def test_an_unreachable_peak_limit_names_itself_and_the_smallest_peak(priced):
    analysis, _, _ = priced
    pp = _problem(priced, peak_activation_bytes(analysis.gm))
    choice, removed = min(
        every_choice(pp.problem), key=lambda c: usage(pp.problem, *c)["activation_bytes"]
    )
    least = usage(pp.problem, choice, removed)["activation_bytes"]
    smallest = Solution(choice, removed, *evaluate(pp.problem, choice, removed), "enumerated")
    assert peak_activation_bytes(fxprune.prune(analysis, pp.plan(smallest))) == least
    too_low = _problem(priced, least - 1)
    with pytest.raises(InfeasibleLimit, match="max_activation_bytes=") as info:
        solve_minlp(too_low.problem, 1e9)
    assert info.value.resource == "activation_bytes"
    assert info.value.minimum == pytest.approx(least) and info.value.limit == least - 1
    solve_minlp(_problem(priced, least).problem, 1e9)  # the smallest itself is reachable
