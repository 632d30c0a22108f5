"""The solver on small synthetic problems: MINLP = brute force, blocks, infeasibility, baselines."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxprune.solver import (
    TIME_LIMIT_BASE_S,
    TIME_LIMIT_MAX_S,
    BlockSpec,
    GroupSpec,
    InfeasibleBudget,
    InfeasibleLimit,
    OpCost,
    Problem,
    Resource,
    Row,
    brute_force,
    channels_only,
    complete,
    default_time_limit,
    evaluate,
    every_choice,
    min_latency,
    min_resource,
    solve_knapsack,
    solve_minlp,
    solve_uniform,
    usage,
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
    assert (
        "use CompileConfig(solve=SolveConfig(solver='minlp')) and use "
        "CompileConfig(allow_block_removal=True) so that residual blocks" in msg
    )
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


def _chain(n: int = 40, k: int = 12, seed: int = 0) -> Problem:
    """A chain of ``n`` groups with ``k`` options each and noisy bilinear costs: too big for
    SCIP to finish in no time, easy for the baselines."""
    rng = np.random.default_rng(seed)
    counts = tuple(range(8, 8 * k + 1, 8))
    groups = tuple(
        GroupSpec(f"g{g}", counts, tuple((np.sort(rng.random(k)).cumsum() / (n * k)).tolist()))
        for g in range(n)
    )
    ops = []
    for a, b in itertools.pairwise(groups):
        t = np.outer(np.asarray(a.counts, float), np.asarray(b.counts, float)) / 1000.0
        ops.append(OpCost(f"{a.name}->{b.name}", a.name, b.name, t + rng.random(t.shape) * 0.5))
    return Problem(groups, tuple(ops), (), const=1.0)


def test_time_limit_returns_the_warm_started_incumbent():
    p = _chain()
    budget = 0.5 * evaluate(p, _full(p), set())[1]
    sol = solve_minlp(p, budget, time_limit=0.0)  # SCIP stops before its search starts
    assert sol.status == "timelimit"
    assert sol.latency <= budget + 1e-9
    assert (sol.objective, sol.latency) == pytest.approx(evaluate(p, sol.choice, sol.removed))
    assert sol.time_limit == 0.0 and sol.time_limit_rule == "given"
    used = [w for w in sol.warm_starts if w.used]
    assert {w.source for w in used} >= {"uniform", "knapsack"}
    assert sol.objective >= max(w.objective for w in used) - 1e-12
    assert sol.incumbent in {"scip", *(w.source for w in used)}
    if sol.incumbent != "scip":  # then the plan is that warm start's
        (w,) = [w for w in used if w.source == sol.incumbent][:1]
        assert complete(p, w.choice) == complete(p, sol.choice)
    text = sol.summary()
    assert "time limit" in text and "warm-started from uniform" in text and "knapsack" in text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), frac=st.floats(0.2, 1.0))
def test_warm_starts_are_feasible_and_never_beat_the_result(problem, frac):
    budget = frac * evaluate(problem, _full(problem), set())[1]
    try:
        sol = solve_minlp(problem, budget, time_limit=5.0)
    except InfeasibleBudget:
        return
    for w in sol.warm_starts:
        value, latency = evaluate(problem, w.choice, w.removed)
        assert (w.objective, w.latency) == pytest.approx((value, latency))
        assert w.used == (latency <= budget)  # SCIP takes every plan that meets the budget
        assert not w.removed  # the baselines prune channels only
        if w.used:
            assert sol.objective >= w.objective - 1e-9
    assert sol.latency <= budget + 1e-6


def test_given_warm_start_is_used_and_reported():
    p = _chain(n=6, k=4)
    budget = 0.6 * evaluate(p, _full(p), set())[1]
    warm = solve_uniform(p, budget)
    sol = solve_minlp(p, budget, warm_start=warm, heuristics=False, time_limit=0.0)
    (w,) = sol.warm_starts
    assert w.source == "given" and w.used and w.objective == pytest.approx(warm.objective)
    assert sol.objective >= warm.objective - 1e-12 and sol.latency <= budget + 1e-9
    too_tight = dataclasses.replace(warm, choice=_full(p))  # over the budget: listed, not used
    sol = solve_minlp(p, budget, warm_start=too_tight, heuristics=False)
    assert [w.used for w in sol.warm_starts] == [False]
    assert sol.latency <= budget + 1e-9


def test_time_limit_scales_with_the_problem_unless_given():
    small, big = _chain(n=4, k=4), _chain(n=60, k=12)
    assert default_time_limit(small) < default_time_limit(big) <= TIME_LIMIT_MAX_S
    assert default_time_limit(small) >= TIME_LIMIT_BASE_S
    huge = _chain(n=300, k=16)
    assert default_time_limit(huge) == TIME_LIMIT_MAX_S
    budget = 0.7 * evaluate(small, _full(small), set())[1]
    sol = solve_minlp(small, budget)
    assert sol.time_limit == default_time_limit(small) and sol.time_limit_rule == "scaled"
    sol = solve_minlp(small, budget, time_limit=7.0)
    assert sol.time_limit == 7.0 and sol.time_limit_rule == "given"


def test_infeasible_budget_with_warm_starts_reports_minimum():
    p = _chain(n=5, k=4)
    smallest = min_latency(p)
    names = [g.name for g in p.groups]
    everything = itertools.product(range(4), repeat=len(names))
    want = min(evaluate(p, dict(zip(names, c, strict=True)), set())[1] for c in everything)
    assert smallest == pytest.approx(want)
    with pytest.raises(InfeasibleBudget) as info:
        solve_minlp(p, 0.9 * smallest, warm_start=solve_uniform(p, 1.1 * smallest))
    assert info.value.min_latency == pytest.approx(smallest)


def _with_params(problem: Problem, frac: float) -> Problem:
    """``problem`` with a parameter-like resource (``cin·cout`` per op, count 0 costs 0, a
    constant besides) limited to ``frac`` of what the full choice uses."""
    ops = []
    for op in problem.ops:
        cin = np.asarray(problem.group(op.in_group).counts if op.in_group else (3,), float)
        cout = np.asarray(problem.group(op.out_group).counts if op.out_group else (5,), float)
        ops.append(dataclasses.replace(op, name=f"{op.name}:params", table=np.outer(cin, cout)))
    resource = Resource("params", tuple(ops), limit=np.inf, const=11.0)
    full = usage(dataclasses.replace(problem, resources=(resource,)), _full(problem), set())
    limited = dataclasses.replace(resource, limit=frac * full["params"])
    return dataclasses.replace(problem, resources=(limited,))


def _brute_force_and_minlp(problem: Problem, budget: float) -> tuple:
    """(brute force's optimum, SCIP's at gap 0); (None, None) when no plan fits, after
    checking that SCIP says so too."""
    try:
        want = brute_force(problem, budget)
    except InfeasibleBudget:
        with pytest.raises((InfeasibleBudget, InfeasibleLimit)):
            solve_minlp(problem, budget)
        return None, None
    return want, solve_minlp(problem, budget, gap=0.0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), frac=st.floats(0.3, 1.0), params=st.floats(0.05, 1.0))
def test_minlp_matches_brute_force_under_a_resource_limit(problem, frac, params):
    """The extra row is exact: SCIP's optimum is brute force's, and both respect the limit."""
    problem = _with_params(problem, params)
    limit = problem.resources[0].limit
    budget = frac * evaluate(problem, _full(problem), set())[1]
    want, got = _brute_force_and_minlp(problem, budget)
    if want is None:
        return
    assert want.resources["params"] <= limit + 1e-6
    assert got.latency <= budget + 1e-6
    assert got.resources == pytest.approx(usage(problem, got.choice, got.removed))
    assert got.resources["params"] <= limit * (1 + 1e-9) + 1e-9
    assert got.objective == pytest.approx(want.objective, rel=1e-6, abs=1e-9)
    for solver in (solve_knapsack, solve_uniform):  # the baselines respect the row too
        try:
            sol = solver(problem, budget)
        except (InfeasibleBudget, InfeasibleLimit):  # channels only: blocks may be needed
            continue
        assert usage(problem, sol.choice, set())["params"] <= limit * (1 + 1e-9) + 1e-9
        assert sol.latency <= budget + 1e-6 and sol.objective <= got.objective + 1e-6


def test_resource_limit_binds_and_an_unreachable_one_names_itself():
    p = _tiny(with_block=False)  # stem (8, 16) → inner (4, 8); conv costs 2 / 4 / 3 / 6
    params = Resource("params", (OpCost("conv", "stem", "inner", np.outer([8, 16], [4, 8])),), 0)
    loose = solve_minlp(p, budget=100.0)
    assert loose.counts(p) == {"stem": 16, "inner": 8} and loose.resources == {}
    limited = dataclasses.replace(p, resources=(dataclasses.replace(params, limit=64.0),))
    sol = solve_minlp(limited, budget=100.0)  # 16·4 = 8·8 = 64: the more important is stem 16
    assert sol.counts(limited) == {"stem": 16, "inner": 4} and sol.resources == {"params": 64}
    assert brute_force(limited, 100.0).objective == pytest.approx(sol.objective)
    for solver in (solve_knapsack, solve_uniform):
        assert solver(limited, 100.0).resources["params"] <= 64
    tiny = dataclasses.replace(p, resources=(dataclasses.replace(params, limit=31.0),))
    for solver in (solve_minlp, solve_knapsack, solve_uniform):
        with pytest.raises(InfeasibleLimit, match="max_params=31 cannot be met") as info:
            solver(tiny, budget=100.0)
        assert info.value.minimum == pytest.approx(32.0) and info.value.resource == "params"
    # reachable alone, not together with the budget: the minimum latency is under the limit
    with pytest.raises(InfeasibleBudget, match="params ≤ 32") as info:
        solve_minlp(
            dataclasses.replace(tiny, resources=(dataclasses.replace(params, limit=32),)), 2.5
        )
    assert info.value.min_latency == pytest.approx(3.0) and info.value.limits == {"params": 32}


def _with_peak(problem: Problem, frac: float) -> Problem:
    """``problem`` with a peak resource (activation bytes): one row per pair of neighbouring
    free groups (bytes per kept channel and a constant), with terms gated by the block when
    there is one (on an outside group, and a constant); limited to ``frac`` of the full
    choice's peak."""
    free = [g for g in problem.groups if not g.sum_of]
    block = problem.blocks[0].name if problem.blocks else None
    rows = []
    for i, (a, b) in enumerate(itertools.pairwise(free)):
        ops = [
            OpCost(f"r{i}:{g.name}", None, g.name, (i + 2.0) * np.asarray([g.counts]), g.block)
            for g in (a, b)
        ]
        if block is not None:  # a branch tensor on the outside group g0, and a frozen one
            ops.append(
                OpCost(f"r{i}:gated", None, "g0", np.asarray([free[0].counts], float), block)
            )
            ops.append(OpCost(f"r{i}:fixed", None, None, np.array([[5.0]]), block))
        rows.append(Row(tuple(ops), 3.0 * i))
    peak = Resource("activation_bytes", rows[0].ops, np.inf, rows[0].const, tuple(rows[1:]))
    full = usage(dataclasses.replace(problem, resources=(peak,)), _full(problem), set())
    limited = dataclasses.replace(peak, limit=frac * full["activation_bytes"])
    return dataclasses.replace(problem, resources=(limited,))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), frac=st.floats(0.3, 1.0), peak=st.floats(0.05, 1.0))
def test_minlp_matches_brute_force_under_a_peak_limit(problem, frac, peak):
    """A peak is a max over rows, each one more row of the MILP: SCIP's optimum is brute
    force's, its usage is its largest row, and it keeps within the limit."""
    problem = _with_peak(problem, peak)
    (resource,) = problem.resources
    assert len(resource.rows) >= 2
    budget = frac * evaluate(problem, _full(problem), set())[1]
    want, got = _brute_force_and_minlp(problem, budget)
    if want is None:
        return
    rows = [
        sum(
            float(op.table[0, complete(problem, got.choice)[op.out_group] if op.out_group else 0])
            for op in row.ops
            if op.block is None or op.block not in got.removed
        )
        + row.const
        for row in resource.rows
    ]
    assert got.resources["activation_bytes"] == pytest.approx(max(rows))
    assert max(rows) <= resource.limit * (1 + 1e-9) + 1e-9
    assert got.latency <= budget + 1e-6
    assert got.objective == pytest.approx(want.objective, rel=1e-6, abs=1e-9)
    least = min(usage(problem, c, r)["activation_bytes"] for c, r in every_choice(problem))
    assert min_resource(problem, "activation_bytes") == pytest.approx(least)
    for solver in (solve_knapsack, solve_uniform):  # the baselines keep every row
        try:
            sol = solver(problem, budget)
        except (InfeasibleBudget, InfeasibleLimit):  # channels only: blocks may be needed
            continue
        assert sol.resources["activation_bytes"] <= resource.limit * (1 + 1e-9) + 1e-9


def test_peak_limit_binds_through_a_removed_block_and_an_unreachable_one_names_itself():
    p = _tiny()  # stem (8, 16) → inner (0, 4, 8) in block blk
    rows = (
        Row(
            (
                OpCost("stem", None, "stem", np.array([[8.0, 16.0]])),
                OpCost("inner", None, "inner", np.array([[0.0, 8.0, 16.0]]), "blk"),
            )
        ),
        # the stem's output and the add's: the add's is gated with the block
        Row(
            (
                OpCost("s", None, "stem", np.array([[8.0, 16.0]])),
                OpCost("add", None, "stem", np.array([[8.0, 16.0]]), "blk"),
            )
        ),
    )
    peak = Resource("activation_bytes", rows[0].ops, 20.0, 0.0, rows[1:])
    limited = dataclasses.replace(p, resources=(peak,))
    sol = solve_minlp(limited, budget=100.0)
    # stem 16 with the block kept peaks at 32; stem 8, inner 4 at 16 (importance 1.5); stem
    # 16 without the block at 16 (importance 2.0)
    assert sol.removed == {"blk"} and sol.counts(limited) == {"stem": 16, "inner": 0}
    assert sol.resources == {"activation_bytes": 16.0}
    assert brute_force(limited, 100.0).objective == pytest.approx(sol.objective)
    tiny = dataclasses.replace(p, resources=(dataclasses.replace(peak, limit=7.0),))
    with pytest.raises(InfeasibleLimit, match="max_activation_bytes=7 cannot be met") as info:
        solve_minlp(tiny, budget=100.0)
    assert info.value.resource == "activation_bytes" and info.value.minimum == pytest.approx(8.0)
    assert "CompileConfig(max_activation_bytes=...)" in str(info.value)
    # the channel-only baselines cannot remove the block: their smallest peak is 16
    with pytest.raises(InfeasibleLimit) as info:
        solve_uniform(tiny, budget=100.0)
    assert info.value.minimum == pytest.approx(16.0)


def test_minlp_keeps_the_optimum_where_a_derived_group_takes_its_top_count():
    """Found by hypothesis: SCIP's inequality simplification cut the optimum off (g2 at 32,
    so the concatenation's 7 + 25 + 32 = 64 is its top count) and reported a worse plan as
    optimal; brute force and SCIP must agree on it."""
    blocked = np.zeros((2, 3))
    blocked[:, 1:] = [[0.34, 1.62], [1.08, 3.97]]
    problem = Problem(
        (
            GroupSpec("g0", (6, 25), (0.509, 1.417)),
            GroupSpec("g1", (0, 1, 13), (0.0, 0.059, 0.482), block="b0"),
            GroupSpec("g2", (31, 32), (0.175, 0.529)),
            GroupSpec(
                "cat", (3, 9, 63, 64), (0.0,) * 4, sum_of=(("g0", 1.0), ("g2", 1.0)), offset=7
            ),
        ),
        (
            OpCost("op0", "g0", "g1", blocked, "b0"),
            OpCost("op1", "g1", "g2", np.array([[0.0, 0.0], [0.80, 0.75], [4.37, 4.47]]), "b0"),
            OpCost("dw", "g0", None, np.array([[0.904], [0.208]]), "b0"),
            OpCost("const_in_block", None, None, np.array([[0.7]]), "b0"),
            OpCost("reader", "cat", None, np.array([[0.843], [0.283], [0.571], [0.849]])),
        ),
        (BlockSpec("b0"),),
        const=1.0,
    )
    budget = 0.25 * evaluate(problem, _full(problem), set())[1]
    want = brute_force(problem, budget)
    got = solve_minlp(problem, budget, gap=0.0)
    assert want.choice == {"g0": 1, "g1": 0, "g2": 1} and want.removed == {"b0"}
    assert got.objective == pytest.approx(want.objective, rel=1e-9)
    assert complete(problem, got.choice)["cat"] == 3
