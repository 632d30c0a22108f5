"""The budget loop's refit: a per-layer cost learnt from block-removing plans, the secant step
on a bracket, and the Illinois rule. Planted latencies, no timing."""

from __future__ import annotations

import pytest
import torch
from fake_backend import FakeBackend
from hypothesis import given
from hypothesis import strategies as st
from latency_models import Net

import fxprune
from fxprune.backends import LatencyCache
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.sampling import random_aligned_plan
from fxprune.latency.tables import LatencyConfig, annotate_latency
from fxprune.pipeline.refit import bracket, illinois, refit


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    analysis = fxprune.analyze(Net().eval(), torch.randn(1, 3, 12, 12))
    tables = annotate_latency(
        analysis,
        FakeBackend(period=8),
        cache=LatencyCache(tmp_path_factory.mktemp("cache")),
        config=LatencyConfig(progress=False),
    )
    return analysis, tables


def _truth(model: LatencyModel, plan) -> float:
    """A runtime whose layers each cost 0.05 ms more in the model than alone."""
    return model.feature(plan) + 0.05 * len(model.layer_costs(plan)) + 0.1


def _plans(analysis, tables, blocks: bool):
    plans = [random_aligned_plan(analysis, tables.group_grids, s, block_prob=0.0) for s in range(8)]
    if blocks:
        plans += [
            random_aligned_plan(analysis, tables.group_grids, s, block_prob=1.0) for s in range(8)
        ]
    return plans


def test_one_block_removing_plan_and_the_dense_model_fix_the_per_layer_cost(setup):
    analysis, tables = setup
    model = LatencyModel(analysis, tables)
    dense = _truth(model, fxprune.Plan.empty(analysis))
    removing = random_aligned_plan(analysis, tables.group_grids, 0, block_prob=1.0)
    assert removing.removed_blocks
    refit(model, analysis, [(removing, _truth(model, removing), dense)], dense)
    assert (model.a, model.per_layer) == pytest.approx((1.0, 0.05), rel=1e-6)
    for plan in _plans(analysis, tables, blocks=True):
        assert model.predict(plan) == pytest.approx(_truth(model, plan), rel=1e-6)


def test_without_removed_blocks_no_per_layer_cost_is_invented(setup):
    analysis, tables = setup
    model = LatencyModel(analysis, tables)
    plan = random_aligned_plan(analysis, tables.group_grids, 1, block_prob=0.0)
    dense = 2.0 * model.feature(fxprune.Plan.empty(analysis)) + 0.3
    refit(model, analysis, [(plan, 2.0 * model.feature(plan) + 0.3, dense)], dense)
    assert model.per_layer == 0.0
    assert (model.a, model.b) == pytest.approx((2.0, 0.3), rel=1e-6)


def test_drift_between_rounds_is_scaled_out(setup):
    """A plan measured while the host ran 10% slow (its dense figure too) fits as if measured
    at the latest dense figure."""
    analysis, tables = setup
    model = LatencyModel(analysis, tables)
    dense = _truth(model, fxprune.Plan.empty(analysis))
    plan = random_aligned_plan(analysis, tables.group_grids, 2, block_prob=1.0)
    refit(model, analysis, [(plan, 1.1 * _truth(model, plan), 1.1 * dense)], dense)
    assert model.predict(plan) == pytest.approx(_truth(model, plan), rel=1e-6)


def test_a_bracket_puts_the_line_through_its_two_ends(setup):
    """Points under and over the budget: the refit's prediction at both bracketing plans is
    what they measured, whatever the other points say."""
    analysis, tables = setup
    model = LatencyModel(analysis, tables)
    dense = 3.0 * model.feature(fxprune.Plan.empty(analysis))
    plans = sorted(_plans(analysis, tables, blocks=False)[:3], key=model.feature)
    measured = [
        1.5 * model.feature(plans[0]),
        2.5 * model.feature(plans[1]),
        3.0 * model.feature(plans[2]),
    ]
    budget = (measured[0] + measured[1]) / 2
    assert measured[0] < budget < measured[1]
    points = [(p, m, dense) for p, m in zip(plans, measured, strict=True)]
    refit(model, analysis, points[::-1], dense, budget)  # order matters only for Illinois
    assert model.predict(plans[0]) == pytest.approx(measured[0], rel=1e-6)
    # the last two measured (plans[1], plans[0]) straddle the budget: no Illinois halving
    assert model.predict(plans[1]) == pytest.approx(measured[1], rel=1e-6)


points_st = st.lists(
    st.tuples(st.floats(0.1, 100.0), st.floats(0.1, 100.0)), min_size=1, max_size=8
)


@given(points_st, st.floats(0.1, 100.0))
def test_bracket_is_the_tightest_under_over_pair(points, budget):
    pair = bracket(points, budget)
    under = [p for p in points if p[1] <= budget]
    if pair is None:
        assert not under or not any(p[1] > budget and p[0] > max(under)[0] for p in points)
        return
    (x0, y0), (x1, y1) = pair
    assert y0 <= budget < y1 and x0 < x1
    assert (x0, y0) in points and (x1, y1) in points
    assert not any(p[1] <= budget and p[0] > x0 for p in points)  # no larger point is under
    assert not any(p[1] > budget and x0 < p[0] < x1 for p in points)  # none over is closer


@given(
    st.floats(1.0, 9.0),
    st.floats(11.0, 20.0),
    st.lists(st.floats(1.0, 20.0), min_size=0, max_size=4),
)
def test_illinois_halves_only_the_stale_end(y0, y1, history):
    budget = 10.0
    order = [(float(i), y) for i, y in enumerate(history)]
    (_, a), (_, b) = illinois(((1.0, y0), (2.0, y1)), order, budget)
    if len(history) >= 2 and min(history[-2:]) > budget:
        assert (a, b) == pytest.approx((budget - (budget - y0) / 2, y1))
    elif len(history) >= 2 and max(history[-2:]) <= budget:
        assert (a, b) == pytest.approx((y0, budget + (y1 - budget) / 2))
    else:
        assert (a, b) == (y0, y1)
    assert a <= budget < b  # still a bracket
