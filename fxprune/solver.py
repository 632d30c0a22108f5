"""The pruning problem and its solvers: MDP's MINLP (exactly linearised, SCIP) and baselines.

The solver never sees an fx graph. A :class:`Problem` says, per coupling group, which kept counts
are allowed and what keeping each is worth; per op, what it costs as a function of the counts of
the (at most two) groups it touches; per removable block, which groups live inside it. MDP's
problem (DESIGN.md §6)::

    max  Σ_g Σ_k I_g[k]·y_g[k]
    s.t. Σ_op y_in(op)ᵀ C_op y_out(op) + const ≤ budget,   Σ_k y_g[k] = 1,
         y_g[0] = z_b for groups internal to block b (option 0 is "keep nothing")

The bilinear latency term is linearised *exactly* with pair variables ``p[i, j] ≥ 0``,
``Σ_j p[i, j] = y_in[i]`` and ``Σ_i p[i, j] = y_out[j]``: with one-hot ``y`` the only feasible
``p`` is the outer product, so SCIP certifies a global optimum of the original problem (MDP's
Outer Approximation could not). An op inside a removed block costs nothing: for an op that
touches only groups outside the block, its cost is gated by ``q ≥ y − z_b``.

Baselines in the same module: a HALP-style multiple-choice knapsack with latency linearised per
group around the full model, and uniform width scaling found by bisection.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxprune.core.errors import FxpruneError

__all__ = [
    "BlockSpec",
    "GroupSpec",
    "InfeasibleBudget",
    "InfeasibleLimit",
    "OpCost",
    "Problem",
    "Resource",
    "Row",
    "Solution",
    "WarmStart",
    "brute_force",
    "channels_only",
    "complete",
    "default_time_limit",
    "derived_option",
    "evaluate",
    "every_choice",
    "min_latency",
    "min_resource",
    "share",
    "solve_knapsack",
    "solve_minlp",
    "solve_uniform",
    "usage",
    "within_limits",
]


#: how each way out of an infeasible budget is spelt in Python (the CLI passes its own flags)
_PYTHON_SPELLING: Mapping[str, str] = {
    "solver": "use CompileConfig(solve=SolveConfig(solver='minlp'))",
    "allow_block_removal": "use CompileConfig(allow_block_removal=True)",
    "layout_floor": "use CompileConfig(latency=LatencyConfig(layout_floor=False))",
}


class InfeasibleBudget(FxpruneError):
    """No plan meets the budget; ``min_latency`` is the smallest reachable.

    The message names only ways out that apply. ``block_removal`` lists what would let
    residual blocks go when the model has removable ones that were not offered: ``"solver"``
    (the knapsack / uniform baselines never remove blocks) and/or ``"allow_block_removal"``
    (it was off); empty when blocks were offered or there are none. ``layout_block`` is the
    runtime's blocked-layout width when it kept smaller counts out of the tables
    (``LatencyConfig.layout_floor``), else 1.
    """

    def __init__(
        self,
        budget: float,
        min_latency: float,
        dense: float | None = None,
        *,
        block_removal: tuple[str, ...] = (),
        layout_block: int = 1,
        limits: Mapping[str, float] | None = None,
    ) -> None:
        self.budget = budget
        self.min_latency = min_latency
        self.dense = dense
        self.block_removal = tuple(block_removal)
        self.layout_block = layout_block
        #: the resource limits the minimum was found under (name → limit), if any
        self.limits = dict(limits or {})
        super().__init__(self.message())

    def message(self, spelling: Mapping[str, str] | None = None) -> str:
        """The explanation, with each way out spelt as in ``spelling`` (default: Python).

        A way out missing from ``spelling`` (a CLI without that flag) is left out.
        """
        spelling = _PYTHON_SPELLING if spelling is None else spelling

        def show(v: float) -> str:
            d = self.dense
            return f"{v:.4g}" if d is None else f"{v:.4g} ms ({v / d:.1%} of dense)"

        ways = []
        blocks = [spelling[k] for k in self.block_removal if k in spelling]
        if blocks and len(blocks) == len(self.block_removal):
            ways.append(f"{' and '.join(blocks)} so that residual blocks can be removed too")
        if self.layout_block > 1 and "layout_floor" in spelling:
            ways.append(
                f"{spelling['layout_floor']} to offer counts below the runtime's "
                f"{self.layout_block}-channel layout block (they run outside its fast layout)"
            )
        under = "".join(f" and {name} ≤ {limit:,.0f}" for name, limit in self.limits.items())
        if self.limits:
            ways.append("raise the " + " / ".join(self.limits) + " limit")
        text = (
            f"The latency budget {show(self.budget)} cannot be met: the smallest latency this "
            f"model can reach under the allowed channel counts{under} is "
            f"{show(self.min_latency)}. Raise the budget to at least that"
        )
        return text + "".join(f", or {w}" for w in ways) + "."


class InfeasibleLimit(FxpruneError):
    """No plan keeps resource ``resource`` (``"params"``, ``"macs"``, ``"activation_bytes"``,
    ``"latency@<runtime>"``: a budget on a further backend) within ``limit``, whatever the
    latency budget; ``minimum`` is the smallest reachable.

    Not an :class:`InfeasibleBudget`: raising the latency budget would not help.
    """

    def __init__(self, resource: str, limit: float, minimum: float) -> None:
        self.resource = resource
        self.limit = limit
        self.minimum = minimum
        if resource.startswith("latency@"):  # a budget on a further backend
            super().__init__(
                f"The latency budget {limit:.4g} ms on {resource.removeprefix('latency@')} "
                f"cannot be met: the smallest latency this model can reach there under the "
                f"allowed channel counts is {minimum:.4g} ms. Raise that budget "
                "(CompileConfig(also=...)) to at least that."
            )
            return
        known = ("params", "macs", "activation_bytes")
        setting = f" (CompileConfig(max_{resource}=...))" if resource in known else ""
        super().__init__(
            f"The {resource} limit max_{resource}={limit:.0f} cannot be met: the smallest "
            f"{resource} this model can reach under the allowed channel counts is "
            f"{minimum:,.0f}. Raise max_{resource}{setting} to at least that."
        )


@dataclass(frozen=True)
class GroupSpec:
    """A coupling group: allowed kept counts (ascending) and the value of keeping each."""

    name: str
    counts: tuple[int, ...]
    importance: tuple[float, ...]
    block: str | None = None  # the removable block this group lives in (then counts[0] == 0)
    #: a *derived* group (an op reading several groups, e.g. a DenseNet concatenation, or a
    #: slice of one): its count is the smallest option ≥ ``offset + Σ share(member)``, where a
    #: member's share is ``coef·count(member)`` for a float ``coef``, or ``coef[k]`` at the
    #: member's option ``k`` for a tuple (one entry per option); not chosen freely
    sum_of: tuple[tuple[str, float | tuple[float, ...]], ...] = ()
    offset: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.importance) or not self.counts:
            raise ValueError(f"group {self.name}: counts and importance must be equal, non-empty")
        if list(self.counts) != sorted(set(self.counts)):
            raise ValueError(f"group {self.name}: counts must be strictly ascending")
        if self.block is not None and self.counts[0] != 0:
            raise ValueError(f"group {self.name} is inside block {self.block}: counts[0] must be 0")


@dataclass(frozen=True)
class OpCost:
    """Cost of one op as a table over the options of its input and output groups.

    ``table`` has shape ``(len(in.counts), len(out.counts))``; use ``None`` for a side that no
    group touches (then that axis has length 1).
    """

    name: str
    in_group: str | None
    out_group: str | None
    table: np.ndarray
    block: str | None = None  # inside this removable block: costs nothing when it is removed


@dataclass(frozen=True)
class BlockSpec:
    name: str


@dataclass(frozen=True)
class Row:
    """One linear row of a resource: ``const + Σ_op y_inᵀ T_op y_out``."""

    ops: tuple[OpCost, ...]
    const: float = 0.0


@dataclass(frozen=True)
class Resource:
    """A resource besides latency with a limit: ``const + Σ_op y_inᵀ T_op y_out ≤ limit``.

    Its ops are tables over group options exactly like the latency ops (parameters and MACs
    of a layer are products of its kept input and output counts), so the MILP adds one more
    exactly linearised row, and a removed block's ops cost nothing here either.

    A *peak* resource (peak activation memory: the largest live set over the execution order)
    is the largest of several such sums: ``more_rows`` holds the others. ``peak ≤ limit`` iff
    every row is, so each is one more row of the MILP (no max variable); its usage is the
    largest row.
    """

    name: str
    ops: tuple[OpCost, ...]
    limit: float
    const: float = 0.0  # what the groups do not change
    more_rows: tuple[Row, ...] = ()

    @property
    def rows(self) -> tuple[Row, ...]:
        """Every row: ``(ops, const)`` first, then ``more_rows``."""
        return (Row(self.ops, self.const), *self.more_rows)


@dataclass(frozen=True)
class Problem:
    groups: tuple[GroupSpec, ...]
    ops: tuple[OpCost, ...]
    blocks: tuple[BlockSpec, ...] = ()
    const: float = 0.0  # latency of everything the groups do not change
    #: further limited resources (parameters, MACs): each an extra linear row
    resources: tuple[Resource, ...] = ()

    def group(self, name: str) -> GroupSpec:
        return next(g for g in self.groups if g.name == name)


@dataclass(frozen=True)
class WarmStart:
    """A plan SCIP was offered before its search: where it came from and what it is worth."""

    source: str  # "given" (the caller's), "uniform", "knapsack"
    choice: Mapping[str, int]
    removed: frozenset[str]
    objective: float
    latency: float
    #: it meets the budget, so SCIP was given it (and the result is at least as good)
    used: bool


@dataclass(frozen=True)
class Solution:
    """Option index per group, removed blocks, and how the solver got there.

    ``status`` is the solver's: for SCIP ``"optimal"``, ``"gaplimit"`` (within ``gap``) or
    ``"timelimit"`` (its best plan when time ran out; ``gap`` says how far from proven).
    ``incumbent`` names where the returned plan came from: ``"scip"`` (found by the search),
    a warm start's source, or ``"fastest"`` (SCIP's fastest plan, when nothing else was found).
    """

    choice: Mapping[str, int]
    removed: frozenset[str]
    objective: float
    latency: float
    status: str
    gap: float = 0.0
    time_s: float = 0.0
    solver: str = ""
    rounds: tuple[dict, ...] = field(default_factory=tuple)
    time_limit: float | None = None
    time_limit_rule: str = ""  # "given" or "scaled" (default_time_limit)
    warm_starts: tuple[WarmStart, ...] = ()
    incumbent: str = ""
    #: per limited resource of the problem, what this choice uses (see :func:`usage`)
    resources: Mapping[str, float] = field(default_factory=dict)

    def counts(self, problem: Problem) -> dict[str, int]:
        choice = complete(problem, self.choice)
        return {g.name: g.counts[choice[g.name]] for g in problem.groups}

    def summary(self) -> str:
        """One sentence for a report: how the solver stopped and where the plan came from."""
        if self.time_limit is None:
            return f"{self.solver}: {self.status} in {self.time_s:.1f} s."
        gap = f"gap {self.gap:.2%}" if np.isfinite(self.gap) else "no bound on the gap yet"
        stop = {
            "optimal": "proved the plan optimal",
            "gaplimit": f"stopped within its gap ({gap})",
            "timelimit": f"hit its {self.time_limit:.3g} s time limit "
            f"({self.time_limit_rule}); {gap}",
        }.get(self.status, f"stopped ({self.status}, {gap})")
        used = [w for w in self.warm_starts if w.used]
        starts = (
            "warm-started from " + ", ".join(f"{w.source} ({w.objective:.1%})" for w in used)
            if used
            else "no feasible warm start"
        )
        source = {
            "scip": "found by SCIP's search",
            "fastest": "the fastest plan SCIP found",
        }.get(self.incumbent, f"the {self.incumbent} warm start (SCIP found nothing better)")
        return (
            f"{self.solver} {stop} after {self.time_s:.1f} s; {starts}; "
            f"the plan is {source}, keeping {self.objective:.1%} of the importance."
        )


def share(problem: Problem, member: str, coef: float | tuple[float, ...], k: int) -> float:
    """What ``member`` at its option ``k`` adds to a derived group's total."""
    if isinstance(coef, tuple):
        return float(coef[k])
    return coef * problem.group(member).counts[k]


def derived_option(problem: Problem, group: GroupSpec, choice: Mapping[str, int]) -> int:
    """The option of a derived group: the smallest count covering its members' total."""
    total = group.offset + sum(share(problem, m, coef, choice[m]) for m, coef in group.sum_of)
    for k, c in enumerate(group.counts):
        if c >= total - 1e-9:
            return k
    return len(group.counts) - 1


def complete(problem: Problem, choice: Mapping[str, int]) -> dict[str, int]:
    """``choice`` with every derived group's option filled in from its members."""
    out = dict(choice)
    for g in problem.groups:
        if g.sum_of:
            out[g.name] = derived_option(problem, g, out)
    return out


def _cost(
    ops: tuple[OpCost, ...],
    const: float,
    choice: Mapping[str, int],
    removed: frozenset[str] | set[str],
) -> float:
    """``const`` plus each op's table at a complete choice (ops of removed blocks cost 0)."""
    total = const
    for op in ops:
        if op.block is not None and op.block in removed:
            continue
        i = choice[op.in_group] if op.in_group else 0
        j = choice[op.out_group] if op.out_group else 0
        total += float(op.table[i, j])
    return total


def evaluate(
    problem: Problem, choice: Mapping[str, int], removed: frozenset[str] | set[str]
) -> tuple[float, float]:
    """(importance, latency) of a choice under the exact (bilinear) model."""
    choice = complete(problem, choice)
    value = sum(g.importance[choice[g.name]] for g in problem.groups)
    return value, _cost(problem.ops, problem.const, choice, removed)


def usage(
    problem: Problem, choice: Mapping[str, int], removed: frozenset[str] | set[str]
) -> dict[str, float]:
    """Per limited resource of ``problem``, what a choice uses (exact, like :func:`evaluate`)."""
    choice = complete(problem, choice)
    return {
        r.name: max(_cost(row.ops, row.const, choice, removed) for row in r.rows)
        for r in problem.resources
    }


def within_limits(
    problem: Problem, choice: Mapping[str, int], removed: frozenset[str] | set[str]
) -> bool:
    """Whether a choice keeps every limited resource within its limit (a relative 1e-9 slack
    absorbs rounding in sums of large counts)."""
    used = usage(problem, choice, removed)
    return all(used[r.name] <= r.limit * (1 + 1e-9) + 1e-9 for r in problem.resources)


def _free(problem: Problem) -> list[GroupSpec]:
    """The groups a solver chooses (derived groups follow their members)."""
    return [g for g in problem.groups if not g.sum_of]


def _full_choice(problem: Problem) -> dict[str, int]:
    return {g.name: len(g.counts) - 1 for g in _free(problem)}


def _check(problem: Problem) -> None:
    names = {g.name for g in problem.groups}
    blocks = {b.name for b in problem.blocks}
    resource_ops = (op for r in problem.resources for row in r.rows for op in row.ops)
    for op in (*problem.ops, *resource_ops):
        shape = (
            len(problem.group(op.in_group).counts) if op.in_group else 1,
            len(problem.group(op.out_group).counts) if op.out_group else 1,
        )
        if (op.in_group and op.in_group not in names) or (
            op.out_group and op.out_group not in names
        ):
            raise ValueError(f"op {op.name} refers to an unknown group")
        if np.shape(op.table) != shape:
            raise ValueError(f"op {op.name}: table shape {np.shape(op.table)} != {shape}")
        if op.block is not None and op.block not in blocks:
            raise ValueError(f"op {op.name}: unknown block {op.block}")
    for g in problem.groups:
        if g.block is not None and g.block not in blocks:
            raise ValueError(f"group {g.name}: unknown block {g.block}")
        for member, coef in g.sum_of:
            if member not in names or problem.group(member).sum_of:
                raise ValueError(f"derived group {g.name}: {member} is not a free group")
            if isinstance(coef, tuple) and len(coef) != len(problem.group(member).counts):
                raise ValueError(f"derived group {g.name}: one share per option of {member}")


#: the value a variable takes under a choice and a set of removed blocks (full warm starts)
_ValueOf = Callable[[Mapping[str, int], frozenset[str]], float]


@dataclass
class _Milp:
    """The SCIP model and its variables, each with the value a given choice gives it."""

    m: Any
    y: dict[str, list]
    z: dict[str, Any]
    #: every variable with its value as a function of (complete choice, removed blocks)
    values: list[tuple[Any, _ValueOf]]


def _build(problem: Problem, budget: float | None, objective: str) -> _Milp:
    """The exact MILP in SCIP, every resource limit a row. ``objective`` is "importance"
    (max), "latency" (min) or ``"resource:<name>"`` (min; that resource's row is left out)."""
    from pyscipopt import Model, quicksum

    _check(problem)
    m = Model("fxprune")
    m.hideOutput()
    milp = _Milp(m, {}, {}, [])
    _choice_vars(milp, problem)
    exact = [_derived_constraints(m, problem, g, milp.y) for g in problem.groups if g.sum_of]
    if not all(exact):
        # SCIP's inequality simplification (scale to integers, divide by the gcd, round) cut
        # off the optimum of a derived group's rows with near-integer coefficients (63.001,
        # tests/test_solver.py): off where a row has them; it speeds up the integral rest
        m.setParam("constraints/linear/simplifyinequalities", False)
    terms = []
    for o, op in enumerate(problem.ops):
        terms.extend(_op_terms(milp, problem, o, op))
    latency = quicksum(terms) + problem.const
    value = quicksum(
        g.importance[k] * milp.y[g.name][k] for g in problem.groups for k in range(len(g.counts))
    )
    if budget is not None:
        m.addCons(latency <= budget)
    minimised = None
    for r in problem.resources:  # the same exact linearisation, one more row each
        rows = []
        for i, row in enumerate(r.rows):
            if objective != f"resource:{r.name}" and _row_max(row) <= r.limit:
                continue  # it can never bind (most live sets under a peak limit)
            tag = r.name if i == 0 else f"{r.name}#{i}:"
            used = [t for o, op in enumerate(row.ops) for t in _op_terms(milp, problem, o, op, tag)]
            rows.append(quicksum(used) + row.const)
        if objective != f"resource:{r.name}":
            for row in rows:
                m.addCons(row <= r.limit)
        elif len(rows) == 1:
            minimised = rows[0]
        else:  # a peak: minimise a bound above every row
            minimised = m.addVar(f"peak[{r.name}]", lb=None)
            for row in rows:
                m.addCons(minimised >= row)
    if objective == "importance":
        m.setObjective(value, "maximize")
    elif objective == "latency":
        m.setObjective(latency, "minimize")
    else:
        m.setObjective(minimised, "minimize")
    return milp


def _row_max(row: Row) -> float:
    """An upper bound of a row over every choice: each op at its largest cell (0 if gated)."""
    return row.const + sum(max(float(np.max(op.table)), 0.0) for op in row.ops)


def _is(group: str, k: int) -> _ValueOf:
    return lambda choice, removed: float(choice[group] == k)


def _choice_vars(milp: _Milp, problem: Problem) -> None:
    """Binary ``z`` per block (removed) and one-hot ``y`` per group (its option)."""
    from pyscipopt import quicksum

    m = milp.m
    for b in problem.blocks:
        milp.z[b.name] = m.addVar(f"z[{b.name}]", vtype="B")
        milp.values.append((milp.z[b.name], lambda c, r, b=b.name: float(b in r)))
    for g in problem.groups:
        milp.y[g.name] = [m.addVar(f"y[{g.name},{k}]", vtype="B") for k in range(len(g.counts))]
        milp.values.extend((v, _is(g.name, k)) for k, v in enumerate(milp.y[g.name]))
        m.addCons(quicksum(milp.y[g.name]) == 1)
        if g.block is not None:  # a removed block keeps nothing, and only then
            m.addCons(milp.y[g.name][0] == milp.z[g.block])


def _derived_constraints(m, problem: Problem, g: GroupSpec, y: Mapping[str, list]) -> bool:
    """Pin a derived group's option to the smallest count covering its members' total.

    ``counts[k-1] < total ≤ counts[k]``  ⇔  ``Σ (counts[k-1]+δ)·y_k ≤ total ≤ Σ counts[k]·y_k``,
    with ``δ = 1`` when every share is a whole number (the total is one too: exact, and the row
    keeps integer coefficients) and a small ``δ`` otherwise. Returns whether ``δ = 1``.
    """
    from pyscipopt import quicksum

    shares = [
        (share(problem, member, coef, k), v)
        for member, coef in g.sum_of
        for k, v in enumerate(y[member])
    ]
    total = g.offset + quicksum(s * v for s, v in shares)
    integral = float(g.offset).is_integer() and all(float(s).is_integer() for s, _ in shares)
    step = 1.0 if integral else 1e-3
    ys = y[g.name]
    m.addCons(quicksum(c * v for c, v in zip(g.counts, ys, strict=True)) >= total - 1e-6)
    lower = [0.0, *(c + step for c in g.counts[:-1])]
    m.addCons(quicksum(c * v for c, v in zip(lower, ys, strict=True)) <= total)
    return integral


def _op_terms(milp: _Milp, problem: Problem, o: int, op: OpCost, row: str = "") -> list:
    """One op's terms ``cost · v``, pair variables linearising ``y_inᵀ C y_out``; ``row``
    names the resource the op belongs to ("": latency) so variable names stay unique."""
    t = np.asarray(op.table, dtype=float)
    y = milp.y
    internal = {g.name for g in problem.groups if g.block is not None and g.block == op.block}
    # an op in a block that touches an internal group already costs 0 through y[g][0];
    # one that touches only outside groups (e.g. a depthwise conv on the residual) is gated
    gated = op.block is not None and not ({op.in_group, op.out_group} & internal)
    if op.in_group and op.out_group:
        cells = _pair_cells(milp, f"{row}{o}", t, op.in_group, op.out_group)
    elif op.in_group:
        cells = [(t[i, 0], v, _is(op.in_group, i)) for i, v in enumerate(y[op.in_group])]
    elif op.out_group:
        cells = [(t[0, j], v, _is(op.out_group, j)) for j, v in enumerate(y[op.out_group])]
    else:
        cells = [(t[0, 0], 1.0, lambda c, r: 1.0)]
    terms = []
    for c, v, value in cells:
        if c == 0:
            continue
        if gated:  # cost only while the block is kept: q ≥ v − z, q ≥ 0
            q = milp.m.addVar(f"q{row}[{o},{len(terms)}]", lb=0.0, ub=1.0)
            milp.m.addCons(q >= v - milp.z[op.block])
            milp.values.append(
                (q, lambda ch, r, f=value, b=op.block: max(0.0, f(ch, r) - float(b in r)))
            )
            v = q
        terms.append(c * v)
    return terms


def _pair_cells(milp: _Milp, o: int | str, t: np.ndarray, g_in: str, g_out: str) -> list:
    """(cost, p[i, j], value) per table cell, ``p`` tied to the one-hot ``y`` on both sides."""
    from pyscipopt import quicksum

    m, ins, outs = milp.m, milp.y[g_in], milp.y[g_out]
    p = [
        [m.addVar(f"p[{o},{i},{j}]", lb=0.0, ub=1.0) for j in range(t.shape[1])]
        for i in range(t.shape[0])
    ]
    for i in range(t.shape[0]):
        m.addCons(quicksum(p[i]) == ins[i])
    for j in range(t.shape[1]):
        m.addCons(quicksum(p[i][j] for i in range(t.shape[0])) == outs[j])
    cells = []
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            value = lambda c, r, i=i, j=j: float(c[g_in] == i and c[g_out] == j)  # noqa: E731
            milp.values.append((p[i][j], value))
            cells.append((t[i, j], p[i][j], value))
    return cells


def _add_start(milp: _Milp, problem: Problem, choice: Mapping[str, int], removed) -> bool:
    """Hand SCIP a complete solution (every variable set); whether SCIP stored it."""
    full = complete(problem, choice)
    removed = frozenset(removed)
    sol = milp.m.createSol()
    for var, value in milp.values:
        milp.m.setSolVal(sol, var, value(full, removed))
    return bool(milp.m.addSol(sol, free=True))


def _read(milp: _Milp) -> tuple[dict[str, int], frozenset[str]]:
    m = milp.m
    choice = {name: int(np.argmax([m.getVal(v) for v in vs])) for name, vs in milp.y.items()}
    removed = frozenset(b for b, v in milp.z.items() if m.getVal(v) > 0.5)
    return choice, removed


def channels_only(problem: Problem) -> Problem:
    """The problem without block removal (what the channel-only baselines can reach)."""
    inside = {g.name for g in problem.groups if g.block is not None}

    def drop_first(sum_of: tuple) -> tuple:  # per-option shares lose the "count 0" entry too
        return tuple((m, c[1:] if isinstance(c, tuple) and m in inside else c) for m, c in sum_of)

    groups = tuple(
        GroupSpec(g.name, g.counts[1:], g.importance[1:], None, g.sum_of, g.offset)
        if g.block is not None
        else dataclasses.replace(g, sum_of=drop_first(g.sum_of))
        for g in problem.groups
    )

    def keep_all(ops: tuple[OpCost, ...]) -> tuple[OpCost, ...]:
        out = []
        for op in ops:
            t = np.asarray(op.table, dtype=float)
            if op.in_group and problem.group(op.in_group).block is not None:
                t = t[1:, :]
            if op.out_group and problem.group(op.out_group).block is not None:
                t = t[:, 1:]
            out.append(OpCost(op.name, op.in_group, op.out_group, t, None))
        return tuple(out)

    resources = tuple(
        dataclasses.replace(
            r,
            ops=keep_all(r.ops),
            more_rows=tuple(Row(keep_all(row.ops), row.const) for row in r.more_rows),
        )
        for r in problem.resources
    )
    return Problem(groups, keep_all(problem.ops), (), problem.const, resources)


#: the time limit SCIP gets when the caller gives none: a base, more per thousand variables
#: (its pair variables are the table cells), capped; see :func:`default_time_limit`
TIME_LIMIT_BASE_S = 30.0
TIME_LIMIT_PER_1000_VARS_S = 10.0
TIME_LIMIT_MAX_S = 300.0


def default_time_limit(problem: Problem) -> float:
    """SCIP's time limit (s) for ``problem`` when none is given: it grows with the model.

    ``min(TIME_LIMIT_MAX_S, TIME_LIMIT_BASE_S + TIME_LIMIT_PER_1000_VARS_S · cells / 1000)``,
    ``cells`` = the options of every group plus the cells of every op's table (one variable
    each in the MILP). A limit given to a solver is used as given.
    """
    cells = sum(len(g.counts) for g in problem.groups) + sum(
        int(np.size(op.table)) for op in problem.ops
    )
    return min(TIME_LIMIT_MAX_S, TIME_LIMIT_BASE_S + TIME_LIMIT_PER_1000_VARS_S * cells / 1000)


def _fastest(problem: Problem, time_limit: float) -> tuple[dict[str, int], frozenset[str], bool]:
    """The fastest choice SCIP finds within ``time_limit``, and whether it proved it fastest."""
    milp = _build(problem, None, "latency")
    # every group at its smallest option and every block removed: a start that always exists
    smallest = {g.name: 0 for g in _free(problem)}
    _add_start(milp, problem, smallest, frozenset(b.name for b in problem.blocks))
    milp.m.setParam("limits/time", time_limit)
    milp.m.optimize()
    choice, removed = _read(milp)
    return choice, removed, milp.m.getStatus() == "optimal"


def min_latency(problem: Problem, time_limit: float | None = None) -> float:
    """The smallest latency any choice reaches (exact, by SCIP; else the best found in time),
    every resource limit respected.

    Raises:
        InfeasibleLimit: when some resource limit cannot be met at all.
    """
    limit = default_time_limit(problem) if time_limit is None else time_limit
    _check_limits(problem, limit)
    choice, removed, _ = _fastest(problem, limit)
    return evaluate(problem, choice, removed)[1]


def min_resource(problem: Problem, name: str, time_limit: float | None = None) -> float:
    """The smallest amount of resource ``name`` any choice uses (its own limit left out, the
    other resources' kept; exact by SCIP, else the best found in time)."""
    limit = default_time_limit(problem) if time_limit is None else time_limit
    milp = _build(problem, None, f"resource:{name}")
    milp.m.setParam("limits/time", limit)
    milp.m.optimize()
    if milp.m.getNSols() == 0:
        return float("inf")
    choice, removed = _read(milp)
    return usage(problem, choice, removed)[name]


def _check_limits(problem: Problem, time_limit: float) -> None:
    """Raise :class:`InfeasibleLimit` for the first resource whose limit no choice meets."""
    for r in problem.resources:
        least = min_resource(problem, r.name, time_limit)
        if least > r.limit * (1 + 1e-9) + 1e-9:
            raise InfeasibleLimit(r.name, r.limit, least)


def _infeasible(problem: Problem, budget: float, time_limit: float) -> InfeasibleBudget:
    """The error for a budget no choice meets: :class:`InfeasibleLimit` raised first when a
    resource limit alone is out of reach, else the smallest latency under the limits."""
    least = min_latency(problem, time_limit)  # raises InfeasibleLimit
    return InfeasibleBudget(budget, least, limits=_limits(problem))


def _limits(problem: Problem) -> dict[str, float]:
    return {r.name: r.limit for r in problem.resources}


def _starts(
    milp: _Milp,
    problem: Problem,
    budget: float,
    warm_start: Solution | None,
    heuristics: bool,
    time_limit: float,
) -> tuple[WarmStart, ...]:
    """Offer SCIP feasible plans: the caller's, uniform scaling's, the knapsack's.

    Each is evaluated exactly; one over the budget or a resource limit (or missing a group)
    is listed, not used.
    """
    found: list[tuple[str, Mapping[str, int], frozenset[str]]] = []
    if warm_start is not None and all(g.name in warm_start.choice for g in _free(problem)):
        found.append(("given", warm_start.choice, frozenset(warm_start.removed)))
    if heuristics:
        uniform = _uniform(problem, budget)
        if uniform is not None:
            found.append(("uniform", uniform[1], frozenset()))
        # a warm start need not be the knapsack's optimum: a loose gap, a short limit per solve
        per_solve = min(5.0, max(0.5, time_limit / 20))
        knapsack = _knapsack_search(problem, budget, per_solve, rounds=8, gap=1e-2)
        if knapsack is not None:
            found.append(("knapsack", knapsack[1], frozenset()))
    out = []
    for source, choice, removed in found:
        value, latency = evaluate(problem, choice, removed)
        used = latency <= budget and within_limits(problem, choice, removed)
        if used:  # SCIP may decline a duplicate; _best still weighs every used start
            _add_start(milp, problem, choice, removed)
        out.append(WarmStart(source, dict(choice), removed, value, latency, used))
    return tuple(out)


def solve_minlp(
    problem: Problem,
    budget: float,
    *,
    time_limit: float | None = None,
    gap: float = 1e-3,
    warm_start: Solution | None = None,
    heuristics: bool = True,
) -> Solution:
    """MDP's problem, solved to a certified ``gap`` by SCIP, or its best plan at the time limit.

    SCIP starts from every feasible plan it is given (``warm_start``) or that the uniform and
    knapsack baselines find (``heuristics``), so whenever one of them meets the budget a plan
    comes back: at the time limit it is SCIP's incumbent, with status ``"timelimit"`` and its
    gap — a result, not an error. The returned :class:`Solution` records the time limit and
    where it came from, the warm starts and which plan won (:meth:`Solution.summary`).

    Args:
        time_limit: seconds for SCIP's search (the heuristics run before it); ``None`` scales
            it with the problem (:func:`default_time_limit`); a number is used as given.
        gap: relative optimality gap at which SCIP stops.
        warm_start: a plan to start from (e.g. the previous round's), used if it fits.
        heuristics: also start from the uniform and knapsack baselines' plans.

    Every resource of the problem (:class:`Resource`) is one more row, kept like the budget.

    Raises:
        InfeasibleBudget: no plan meets the budget, with the smallest reachable latency.
        InfeasibleLimit: no plan meets a resource limit, whatever the budget.
        FxpruneError: SCIP ran out of time before finding any plan or proving there is none,
            and no warm start nor the fastest plan found meets the budget.
    """
    start = time.perf_counter()
    limit = default_time_limit(problem) if time_limit is None else float(time_limit)
    rule = "scaled" if time_limit is None else "given"
    milp = _build(problem, budget, "importance")
    starts = _starts(milp, problem, budget, warm_start, heuristics, limit)
    m = milp.m
    m.setParam("limits/time", limit)
    m.setParam("limits/gap", gap)
    m.optimize()
    status = m.getStatus()
    record = {"time_limit": limit, "time_limit_rule": rule, "warm_starts": starts}
    best = _best(milp, problem, starts)
    if best is None:
        if status == "infeasible":
            raise _infeasible(problem, budget, limit)
        _check_limits(problem, limit)
        choice, removed, proved = _fastest(problem, limit)
        value, latency = evaluate(problem, choice, removed)
        if latency > budget or not within_limits(problem, choice, removed):
            if proved:
                raise InfeasibleBudget(budget, latency, limits=_limits(problem))
            raise FxpruneError(
                f"SCIP found no plan meeting the budget {budget:.4g} within its {limit:.3g} s "
                f"time limit (status {status}), nor did the uniform or knapsack baselines; the "
                f"fastest plan it found takes {latency:.4g}. Raise SolveConfig.time_limit, or the budget."
            )
        best = (value, latency, choice, removed, "fastest")
    value, latency, choice, removed, incumbent = best
    return Solution(
        choice,
        removed,
        value,
        latency,
        status,
        _gap(m, value),
        time.perf_counter() - start,
        "scip-minlp",
        incumbent=incumbent,
        resources=usage(problem, choice, removed),
        **record,
    )


def _best(
    milp: _Milp, problem: Problem, starts: tuple[WarmStart, ...]
) -> tuple[float, float, dict[str, int], frozenset[str], str] | None:
    """(importance, latency, choice, removed, source) of the best plan: SCIP's incumbent, or a
    warm start SCIP did not keep (a duplicate, or one its tolerances rejected); None: none."""
    best = None
    if milp.m.getNSols() > 0:
        choice, removed = _read(milp)
        value, latency = evaluate(problem, choice, removed)
        full = complete(problem, choice)
        source = next(
            (
                w.source
                for w in starts
                if w.used and w.removed == removed and complete(problem, w.choice) == full
            ),
            "scip",
        )
        best = (value, latency, choice, removed, source)
    for w in starts:
        if w.used and (best is None or w.objective > best[0] + 1e-12):
            best = (w.objective, w.latency, dict(w.choice), w.removed, w.source)
    return best


def _gap(m, value: float) -> float:
    """SCIP's relative gap between ``value`` and its dual bound; inf while it has none."""
    dual = float(m.getDualbound())
    if abs(dual) >= m.infinity():
        return float("inf")
    if abs(dual - value) <= 1e-12:
        return 0.0
    return abs(dual - value) / max(min(abs(dual), abs(value)), 1e-12)


def _linearised_costs(
    problem: Problem, ops: tuple[OpCost, ...] | None = None
) -> dict[str, np.ndarray]:
    """HALP's view: each free group's latency (or the cost of ``ops``: a resource's) as a
    vector, every other group at full width.

    A derived group's cost is charged to its members through its count: a member at count
    ``c`` shrinks the derived total by ``coef·(full − c)``.
    """
    full = complete(problem, _full_choice(problem))
    costs = {g.name: np.zeros(len(g.counts)) for g in problem.groups}
    for op in problem.ops if ops is None else ops:
        t = np.asarray(op.table, dtype=float)
        i_full = full[op.in_group] if op.in_group else 0
        j_full = full[op.out_group] if op.out_group else 0
        if op.in_group:
            costs[op.in_group] += t[:, j_full] - t[i_full, j_full]
        if op.out_group:
            costs[op.out_group] += t[i_full, :] - t[i_full, j_full]
    for g in problem.groups:
        if not g.sum_of:
            continue
        for member, _ in g.sum_of:
            spec = problem.group(member)
            for k in range(len(spec.counts)):
                option = derived_option(problem, g, {**full, member: k})
                costs[member][k] += costs[g.name][option]
    return {name: c for name, c in costs.items() if not problem.group(name).sum_of}


def solve_knapsack(
    problem: Problem, budget: float, *, time_limit: float = 30.0, rounds: int = 20
) -> Solution:
    """HALP-style baseline: a multiple-choice knapsack on per-group linearised latency.

    The linearised model ignores how a layer's cost depends on *both* its counts, so its choice
    is re-evaluated exactly; the knapsack budget is tightened by bisection until the exact
    latency fits. Resource limits are linearised the same way, each row tightened in step
    with the latency row, and the choice kept only when its exact usage fits too. Blocks are
    never removed (HALP prunes channels only).
    """
    start = time.perf_counter()
    best = _knapsack_search(problem, budget, time_limit, rounds)
    if best is None:
        raise _infeasible(channels_only(problem), budget, time_limit)
    value, choice, latency = best
    return Solution(
        choice,
        frozenset(),
        value,
        latency,
        "feasible",
        0.0,
        time.perf_counter() - start,
        "knapsack",
        resources=usage(problem, choice, frozenset()),
    )


def _knapsack_search(
    problem: Problem, budget: float, time_limit: float, rounds: int, gap: float = 0.0
) -> tuple[float, dict[str, int], float] | None:
    """(importance, choice, latency) of the best knapsack choice meeting ``budget`` (and every
    resource limit), or None."""
    full_choice = _full_choice(problem)
    _, full_latency = evaluate(problem, full_choice, set())
    costs = _linearised_costs(problem)
    full = complete(problem, full_choice)
    # every row of every resource: (its limit, its use at full width, its linearised costs)
    rows = [
        (r.limit, _cost(row.ops, row.const, full, set()), _linearised_costs(problem, row.ops))
        for r in problem.resources
        for row in r.rows
        if _row_max(row) > r.limit  # the others can never bind
    ]
    floors = [use + sum(c.min() for c in rc.values()) for _, use, rc in rows]

    best: tuple[float, dict[str, int], float] | None = None
    lo, hi = full_latency + sum(c.min() for c in costs.values()), budget
    floor = lo
    for cap in [budget, *([None] * rounds)]:
        if cap is None:
            cap = (lo + hi) / 2
        # each resource row is tightened in step: at the same fraction of its way from its
        # linearised floor to its limit as the latency cap is from its floor to the budget
        step = (cap - floor) / (budget - floor) if budget > floor else 1.0
        extra = [
            (rc, f + step * (limit - f) - use)
            for (limit, use, rc), f in zip(rows, floors, strict=True)
        ]
        choice = _knapsack(problem, costs, cap - full_latency, time_limit, gap, extra)
        if choice is None:
            lo = cap
            continue
        value, latency = evaluate(problem, choice, set())
        if latency <= budget and within_limits(problem, choice, set()):
            if best is None or value > best[0]:
                best = (value, choice, latency)
            if cap >= budget:
                break  # the linearised budget itself holds exactly: nothing to tighten
            lo = cap
        else:
            hi = cap
    return best


def _knapsack(
    problem: Problem,
    costs: Mapping[str, np.ndarray],
    cap: float,
    time_limit: float,
    gap: float = 0.0,
    extra: list[tuple[Mapping[str, np.ndarray], float]] = (),
) -> dict[str, int] | None:
    """The most important choice whose linearised extra latency is at most ``cap``, and each
    ``extra`` row's (linearised costs, cap) likewise (None: none)."""
    from pyscipopt import Model, quicksum

    m = Model("knapsack")
    m.hideOutput()
    m.setParam("limits/time", time_limit)
    m.setParam("limits/gap", gap)
    y = {
        g.name: {k: m.addVar(vtype="B") for k, c in enumerate(g.counts) if c > 0}
        for g in problem.groups
        if not g.sum_of
    }
    for vs in y.values():
        m.addCons(quicksum(vs.values()) == 1)
    m.addCons(quicksum(costs[n][k] * v for n, vs in y.items() for k, v in vs.items()) <= cap)
    for row, row_cap in extra:
        m.addCons(quicksum(row[n][k] * v for n, vs in y.items() for k, v in vs.items()) <= row_cap)
    m.setObjective(
        quicksum(problem.group(n).importance[k] * v for n, vs in y.items() for k, v in vs.items()),
        "maximize",
    )
    m.optimize()
    if m.getNSols() == 0:
        return None
    return {n: max(vs, key=lambda k: m.getVal(vs[k])) for n, vs in y.items()}


def solve_uniform(problem: Problem, budget: float, *, iters: int = 40) -> Solution:
    """Uniform width scaling: the largest fraction f with every group at ≤ f of its width
    whose plan meets the budget and every resource limit."""
    start = time.perf_counter()
    best = _uniform(problem, budget, iters)
    if best is None:
        raise _infeasible(channels_only(problem), budget, default_time_limit(problem))
    value, choice, latency = best
    return Solution(
        choice,
        frozenset(),
        value,
        latency,
        "feasible",
        0.0,
        time.perf_counter() - start,
        "uniform",
        resources=usage(problem, choice, frozenset()),
    )


def _uniform(
    problem: Problem, budget: float, iters: int = 40
) -> tuple[float, dict[str, int], float] | None:
    """(importance, choice, latency) of the widest uniform scaling meeting ``budget`` and the
    resource limits, or None."""

    def choice_at(f: float) -> dict[str, int]:
        out = {}
        for g in _free(problem):
            target = f * g.counts[-1]
            ks = [k for k, c in enumerate(g.counts) if c > 0 and c <= target + 1e-9]
            out[g.name] = ks[-1] if ks else next(k for k, c in enumerate(g.counts) if c > 0)
        return out

    def fits(choice: dict[str, int]) -> bool:
        return evaluate(problem, choice, set())[1] <= budget and within_limits(
            problem, choice, set()
        )

    lo, hi = 0.0, 1.0
    if fits(choice_at(1.0)):
        lo = 1.0
    else:
        for _ in range(iters):
            mid = (lo + hi) / 2
            if fits(choice_at(mid)):
                lo = mid
            else:
                hi = mid
    choice = choice_at(lo)
    value, latency = evaluate(problem, choice, set())
    return (value, choice, latency) if fits(choice) else None


def every_choice(problem: Problem) -> Iterator[tuple[dict[str, int], frozenset[str]]]:
    """Every (choice, removed blocks) of a problem: each set of removed blocks, and each option
    of every free group (0 inside a removed block, a kept count elsewhere). Tiny problems only."""
    import itertools

    names = [g.name for g in _free(problem)]
    blocks = [b.name for b in problem.blocks]
    for removed_bits in itertools.product((0, 1), repeat=len(blocks)):
        removed = frozenset(b for b, r in zip(blocks, removed_bits, strict=True) if r)
        ranges = []
        for g in _free(problem):
            if g.block is not None and g.block in removed:
                ranges.append([0])
            else:
                ranges.append([k for k, c in enumerate(g.counts) if c > 0])
        for combo in itertools.product(*ranges):
            yield dict(zip(names, combo, strict=True)), removed


def brute_force(problem: Problem, budget: float) -> Solution:
    """Enumerate every choice (tiny problems only): the reference optimum for tests."""
    best = None
    for choice, removed in every_choice(problem):
        value, latency = evaluate(problem, choice, removed)
        if latency > budget + 1e-9 or not within_limits(problem, choice, removed):
            continue
        if best is None or value > best.objective + 1e-12:
            best = Solution(
                choice,
                removed,
                value,
                latency,
                "optimal",
                solver="brute-force",
                resources=usage(problem, choice, removed),
            )
    if best is None:
        raise InfeasibleBudget(budget, float("nan"))
    return best
