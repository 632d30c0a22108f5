"""The channel-space pass on a generated family of small graphs: any valid plan prunes to a model
that runs, has the planned channel counts and equals the masking oracle.

The family mixes what makes coupling hard: one-channel and wider slices of conv outputs
(``getitem``, ``narrow``, ``split``, ``tensor_split``), reductions that keep a dim of 1,
broadcasting elementwise ops between all of them (a slice or reduction against the tensor it
was taken of, often), concatenation, BN and activations. Hand-written cases
(``test_channel_rules.py``) check the rules one at a time; this checks them in combination.
The masking oracle alone would pass a plan that empties a one-channel slice: ``check_plan``
also runs the pruned model and compares every layer's channel counts with the plan's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import check_plan, make_sensitive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import plans
from torch import nn

import fxprune

#: a step reads pool entries by position and appends its result to the pool
_KINDS = ("slice", "slice", "binary", "binary", "reduce", "conv", "cat", "bn", "act")
_PAIRS = ("binary", "cat")  # steps that read a second pool entry


@st.composite
def programs(draw) -> tuple[int, list[tuple]]:
    """A stem width and a list of steps over a pool of (channels, full spatial) tensors."""
    stem = draw(st.integers(2, 5))
    pool = [(stem, True)]
    source: list[int | None] = [None]  # what each slice or reduction was taken of
    steps: list[tuple] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(_KINDS))
        # the newest tensor half of the time: chains of ops, not just siblings of the stem
        i = draw(st.one_of(st.just(len(pool) - 1), st.integers(0, len(pool) - 1)))
        c, full = pool[i]
        source.append(i if kind in ("slice", "reduce") else None)
        if kind == "slice":
            start = draw(st.integers(0, c - 1))
            stop = draw(st.integers(start + 1, c))
            form = draw(st.sampled_from(("getitem", "narrow", "split", "tensor_split")))
            steps.append(("slice", i, start, stop, form))
            pool.append((stop - start, full))
        elif kind == "binary":
            partners = [j for j, (cj, _) in enumerate(pool) if c == cj or 1 in (c, cj)]
            j = draw(st.sampled_from(partners))
            if source[i] in partners and draw(st.booleans()):
                j = source[i]  # a slice or reduction against what it was taken of
            op = draw(st.sampled_from(("add", "sub", "mul")))
            steps.append(("binary", i, j, op))
            pool.append((max(c, pool[j][0]), full or pool[j][1]))
        elif kind == "reduce":
            how = draw(st.sampled_from(("sum", "mean", "amax", "spatial")))
            steps.append(("reduce", i, how))
            pool.append((c, False) if how == "spatial" else (1, full))
        elif kind == "conv":
            out = draw(st.integers(1, 5))
            steps.append(("conv", i, c, out))
            pool.append((out, full))
        elif kind == "cat":
            j = draw(st.sampled_from([j for j, (_, f) in enumerate(pool) if f == full]))
            steps.append(("cat", i, j))
            pool.append((c + pool[j][0], full))
        elif kind == "bn":
            steps.append(("bn", i, c))
            pool.append((c, full))
        else:
            steps.append(("act", i, draw(st.sampled_from(("relu", "sigmoid")))))
            pool.append((c, full))
    return stem, steps


class Program(nn.Module):
    """Runs the steps of :func:`programs`; every tensor no step reads feeds a conv head."""

    def __init__(self, stem: int, steps: list[tuple]) -> None:
        super().__init__()
        self.steps = steps
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.layers = nn.ModuleDict()
        widths = [stem]
        for n, step in enumerate(steps):
            if step[0] == "conv":
                self.layers[f"s{n}"] = nn.Conv2d(step[2], step[3], 1)
            elif step[0] == "bn":
                self.layers[f"s{n}"] = nn.BatchNorm2d(step[2])
            widths.append(_width(step, widths))
        read = {step[1] for step in steps} | {step[2] for step in steps if step[0] in _PAIRS}
        self.widths = widths
        self.leaves = [k for k in range(len(widths)) if k not in read]
        self.heads = nn.ModuleList(nn.Conv2d(widths[k], 2, 1) for k in self.leaves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = [self.stem(x)]
        for n, step in enumerate(self.steps):
            kind, t = step[0], pool[step[1]]
            if kind == "slice":
                _, _, start, stop, form = step
                if form == "getitem":
                    y = t[:, start:stop]
                elif form == "narrow":
                    y = t.narrow(1, start, stop - start)
                elif form == "split":
                    sizes = [s for s in (start, stop - start, self.widths[step[1]] - stop) if s]
                    y = torch.split(t, sizes, 1)[1 if start else 0]
                else:
                    y = torch.tensor_split(t, [start, stop], 1)[1]
            elif kind == "binary":
                u, op = pool[step[2]], step[3]
                y = t + u if op == "add" else t - u if op == "sub" else t * u
            elif kind == "reduce":
                how = step[2]
                if how == "spatial":
                    y = t.mean((2, 3), keepdim=True)
                elif how == "amax":
                    y = t.amax(1, keepdim=True)
                else:
                    y = getattr(t, how)(1, keepdim=True)
            elif kind == "cat":
                y = torch.cat([t, pool[step[2]]], 1)
            elif kind in ("conv", "bn"):
                y = self.layers[f"s{n}"](t)
            else:
                y = torch.relu(t) if step[2] == "relu" else torch.sigmoid(t)
            pool.append(y)
        return sum(
            F.adaptive_avg_pool2d(h(pool[k]), 1)
            for h, k in zip(self.heads, self.leaves, strict=True)
        )


def _width(step: tuple, widths: list[int]) -> int:
    kind, c = step[0], widths[step[1]]
    if kind == "slice":
        return step[3] - step[2]
    if kind == "binary":
        return max(c, widths[step[2]])
    if kind == "reduce":
        return c if step[2] == "spatial" else 1
    if kind == "conv":
        return step[3]
    if kind == "cat":
        return c + widths[step[2]]
    return c


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), data=st.data())
def test_any_plan_on_generated_graphs_runs_and_equals_masking(program, data):
    stem, steps = program
    torch.manual_seed(0)
    model = make_sensitive(Program(stem, steps).eval())
    x = torch.randn(1, 3, 8, 8)
    a = fxprune.analyze(model, x)
    plan = data.draw(plans(a))
    check_plan(a, plan, x)
