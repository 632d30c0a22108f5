"""The solver on small synthetic problems: MINLP = brute force, blocks, infeasibility, baselines."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxprune.solver import (
    BlockSpec,
    GroupSpec,
    InfeasibleBudget,
    OpCost,
    Problem,
    brute_force,
    channels_only,
    complete,
    evaluate,
    min_latency,
    solve_knapsack,
    solve_minlp,
    solve_uniform,
)


@st.composite
def problems(draw):
    """A chain of 3-4 groups with bilinear op costs, optionally one block holding one group."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(3, 4))
    with_block = draw(st.booleans())
    groups = []
    for g in range(n):
        k = int(rng.integers(2, 5))
        counts = tuple(sorted(rng.choice(np.arange(1, 33), size=k, replace=False).tolist()))
        imp = np.sort(rng.random(k)).cumsum()
        if with_block and g == 1:
            counts, imp = (0, *counts), np.concatenate([[0.0], imp])
        groups.append(
            GroupSpec(f"g{g}", counts, tuple(imp.tolist()), "b0" if with_block and g == 1 else None)
        )
    ops = []
    for g in range(n - 1):
        a, b = groups[g], groups[g + 1]
        t = np.outer(np.asarray(a.counts, float), np.asarray(b.counts, float)) / 100.0
        t += rng.random(t.shape)  # non-monotone noise: steps, like a real runtime
        if with_block and 1 in (g, g + 1):
            t[(np.asarray(a.counts)[:, None] == 0) | (np.asarray(b.counts)[None, :] == 0)] = 0.0
        ops.append(
            OpCost(f"op{g}", a.name, b.name, t, "b0" if with_block and 1 in (g, g + 1) else None)
        )
    ops.append(
        OpCost(
            "dw", "g0", None, rng.random((len(groups[0].counts), 1)), "b0" if with_block else None
        )
    )
    ops.append(
        OpCost("const_in_block", None, None, np.array([[0.7]]), "b0" if with_block else None)
    )
    if draw(st.booleans()):
        # a concatenation of g0 and the last group read by one conv (DenseNet): a derived group
        # over totals on a coarse grid, with a non-monotone cost
        last = groups[-1]
        coef = float(draw(st.sampled_from([1.0, 2.0])))
        top = 7 + coef * (groups[0].counts[-1] + last.counts[-1])
        totals = tuple(sorted({*rng.integers(1, int(top), size=3).tolist(), int(np.ceil(top))}))
        cat = GroupSpec(
            "cat", totals, (0.0,) * len(totals), sum_of=(("g0", 1.0), (last.name, coef)), offset=7
        )
        groups.append(cat)
        ops.append(OpCost("reader", "cat", None, rng.random((len(totals), 1)) + 0.1))
    blocks = (BlockSpec("b0"),) if with_block else ()
    return Problem(tuple(groups), tuple(ops), blocks, const=1.0)


def _full(problem: Problem) -> dict[str, int]:
    return {g.name: len(g.counts) - 1 for g in problem.groups if not g.sum_of}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), frac=st.floats(0.2, 1.0))
def test_minlp_matches_brute_force(problem, frac):
    full = evaluate(problem, _full(problem), set())[1]
    budget = frac * full
    try:
        want = brute_force(problem, budget)
    except InfeasibleBudget:
        with pytest.raises(InfeasibleBudget):
            solve_minlp(problem, budget)
        return
    got = solve_minlp(problem, budget, gap=0.0)
    assert got.latency <= budget + 1e-6
    assert got.choice == complete(problem, got.choice)  # derived groups are exact, not slack
    assert got.objective == pytest.approx(want.objective, rel=1e-6, abs=1e-9)
    assert got.status == "optimal"


def _tiny(with_block: bool = True) -> Problem:
    groups = (
        GroupSpec("stem", (8, 16), (1.0, 2.0)),
        GroupSpec("inner", (0, 4, 8), (0.0, 0.5, 0.6), "blk" if with_block else None)
        if with_block
        else GroupSpec("inner", (4, 8), (0.5, 0.6)),
    )
    t = (
        np.array([[0.0, 2.0, 4.0], [0.0, 3.0, 6.0]])
        if with_block
        else np.array([[2.0, 4.0], [3.0, 6.0]])
    )
    ops = (OpCost("conv", "stem", "inner", t, "blk" if with_block else None),)
    return Problem(groups, ops, (BlockSpec("blk"),) if with_block else (), const=1.0)


def test_block_removal_zeroes_internal_groups():
    p = _tiny()
    sol = solve_minlp(p, budget=1.5)  # only reachable by removing the block
    assert sol.removed == {"blk"} and sol.counts(p)["inner"] == 0
    assert sol.latency == pytest.approx(1.0)
    sol = solve_minlp(p, budget=100.0)
    assert not sol.removed and sol.counts(p) == {"stem": 16, "inner": 8}


def test_infeasible_budget_reports_minimum():
    p = _tiny(with_block=False)
    with pytest.raises(InfeasibleBudget, match=r"smallest latency .* is 3") as info:
        solve_minlp(p, budget=2.0)
    assert info.value.min_latency == pytest.approx(3.0)


def test_infeasible_message_names_only_the_ways_out_given():
    bare = str(InfeasibleBudget(2.0, 3.0))
    assert bare.endswith("Raise the budget to at least that.")
    assert "block" not in bare and "smaller counts" not in bare and "layout" not in bare
    both = InfeasibleBudget(
        2.0, 3.0, 10.0, block_removal=("solver", "allow_block_removal"), layout_block=16
    )
    msg = str(both)
    assert "3 ms (30.0% of dense)" in msg
    assert "pass solver='minlp' and pass allow_block_removal=True so that residual blocks" in msg
    assert "LatencyConfig(layout_floor=False)" in msg and "16-channel layout block" in msg
    # a front end without a spelling for a way out leaves that way out
    cli = both.message({"solver": "--solver minlp", "allow_block_removal": "drop --no-blocks"})
    assert "--solver minlp and drop --no-blocks" in cli and "layout" not in cli
    assert "allow_block_removal=True" not in cli
    assert "block" not in both.message({"allow_block_removal": "drop --no-blocks"})


def test_baselines_report_the_channel_only_minimum():
    p = _tiny()  # 1.5 ms is reachable only by removing the block
    assert min_latency(p) == pytest.approx(1.0)
    for solver in (solve_knapsack, solve_uniform):
        with pytest.raises(InfeasibleBudget) as info:
            solver(p, budget=1.5)
        assert info.value.min_latency == pytest.approx(min_latency(channels_only(p)))
        assert info.value.min_latency == pytest.approx(3.0)  # stem 8 × inner 4


def test_warm_start_and_statistics():
    p = _tiny()
    warm = solve_uniform(_tiny(with_block=False), budget=5.0)
    sol = solve_minlp(p, budget=5.0, warm_start=warm)
    assert sol.status == "optimal" and sol.gap == pytest.approx(0.0) and sol.time_s > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), frac=st.floats(0.4, 1.0))
def test_baselines_feasible_and_never_better_than_minlp(problem, frac):
    full = evaluate(problem, _full(problem), set())[1]
    budget = frac * full
    try:
        best = solve_minlp(problem, budget, gap=0.0)
    except InfeasibleBudget:
        return
    for solver in (solve_knapsack, solve_uniform):
        try:
            sol = solver(problem, budget)
        except InfeasibleBudget:
            continue  # a baseline may fail where the exact problem (with blocks) succeeds
        assert sol.latency <= budget + 1e-6
        assert sol.objective <= best.objective + 1e-6
