"""Sizes computed from shape reads of pruned channel dims (``fxprune/analysis/sizes.py``):
which uses stay prunable, which freeze, and that the rewrite's sizes are the planned ones."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from helpers import check_plan, check_random_plans, make_sensitive
from hypothesis import HealthCheck, given, settings
from size_models import LinearNorm, MultiHead, NonSizeUse, SpatialReduction, Tokens
from strategies import plans
from torch import fx, nn

import fxprune
from fxprune.analysis.sizes import SizeExpr, planned_shape
from fxprune.core.meta import SIZE_ARGS, SIZES

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CASES = {
    "tokens": (Tokens, (2, 3, 8, 8)),
    "spatial_reduction": (SpatialReduction, (2, 3, 8, 8)),
    "multi_head": (MultiHead, (2, 5, 4)),
    "multi_head_wide": (lambda: MultiHead(heads=8), (2, 5, 4)),
    "non_size_use": (NonSizeUse, (2, 5, 4)),
    "linear_norm": (LinearNorm, (2, 5, 4)),
}


def _analysis(name: str):
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model = make_sensitive(cls().eval())
    x = torch.randn(shape)
    return model, x, fxprune.analyze(model, x)


def _node(a: fxprune.Analysis, name: str) -> fx.Node:
    return next(n for n in a.gm.graph.nodes if n.name == name)


def _calls(gm: fx.GraphModule, method: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == method]


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_plans_equal_masking_and_run_at_planned_shapes(name):
    _, x, a = _analysis(name)

    check_random_plans(a, x, max_examples=15)


def test_shape_reads_are_followed_with_their_channels():
    _, _, a = _analysis("tokens")
    reads = {n.name: n.meta[SIZES] for n in a.gm.graph.nodes if n.meta.get(SIZES) is not None}
    shape = next(v for k, v in reads.items() if k.startswith("getattr") and len(v) == 3)
    batch, tokens, channels = shape
    assert (batch.dense, tokens.dense, channels.dense) == (2, 64, 8)
    assert not batch.on_channels and not tokens.on_channels and channels.on_channels
    fc = a.group("fc")
    keep = a.spaces.keep_units({"fc": np.arange(3)})
    assert channels.value(keep) == 3 and fc.prunable
    # the reshape back to B, C, H, W records its four size slots, C's from the shape read
    (reshape,) = _calls(a.gm, "reshape")
    slots = reshape.meta[SIZE_ARGS]
    assert [s.dims for s in slots] == [(0,), (1,), (2,), (3,)]
    assert isinstance(slots[1].value, SizeExpr) and slots[1].value.on_channels
    assert planned_shape(reshape, keep) == (2, 3, 8, 8)


def test_arithmetic_on_sizes_is_a_known_function_of_the_counts():
    _, _, a = _analysis("multi_head")
    (div,) = [n for n in a.gm.graph.nodes if n.target is operator.floordiv]
    expr = div.meta[SIZES]
    assert expr.dense == 4 and "//" in expr.text
    keep = a.spaces.keep_units({"embed": np.arange(12)})  # C = 12 in the pruned block input
    assert expr.value(keep) == 3


def test_spatial_reduction_sizes_come_from_the_reshaped_tensor():
    """``sr(x).reshape(B, C, -1)`` reads C off the block input; the rewrite writes sr's own
    pruned count there. The final reshape reads C off the tensor it reshapes: left as it is."""
    _, x, a = _analysis("spatial_reduction")
    assert all(a.group(g).prunable for g in ("embed", "sr", "kv"))
    plan = fxprune.Plan({"embed": (0, 1, 2, 3, 4), "sr": (1, 2, 5), "kv": (0, 7)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    sizes = [n.args[1:] for n in _calls(pruned, "reshape")]
    assert sizes[1][1] == 3  # reshape(B, <sr's 3>, -1), not the block input's 5
    assert isinstance(sizes[2][1], fx.Node)  # reshape(B, C, H, W): C is embed's 5 already
    assert pruned.sr.out_channels == 3 and pruned.sr.in_channels == 5


@pytest.mark.parametrize(("name", "heads", "size", "per_index"), [
    ("multi_head", 4, 4, 4),  # head_dim 4 >= 4 heads: an index is one position in every head
    ("multi_head_wide", 8, 8, 2),  # 8 heads of 2: an index is a whole head
])  # fmt: skip
def test_head_split_stays_prunable_at_counts_that_keep_heads_even(name, heads, size, per_index):
    """``reshape(B, N, h, C // h)`` never divides unevenly: q's group is prunable, but only at
    counts that keep the heads of equal width (each index covers channels of every head, or a
    whole head), so q's width is always a multiple of what one index covers."""
    _, x, a = _analysis(name)
    q = a.group("q")
    assert q.prunable and q.size == size
    rng = np.random.default_rng(0)
    for _ in range(5):
        k = int(rng.integers(1, size))
        kept = tuple(sorted(rng.choice(size, k, replace=False).tolist()))
        pruned = check_plan(a, fxprune.Plan({"q": kept}, (), a.signature), x)
        assert pruned.q.out_features == k * per_index
        (split, merge) = _calls(pruned, "reshape")
        heads_by_width = tuple(split.meta["tensor_meta"].shape[2:])
        if per_index == heads:  # pruned within each head: still `heads` heads
            assert split.args[3:] == (heads, k) and heads_by_width == (heads, k)
        else:  # whole heads pruned; C // heads read off the unpruned input is 2 already
            assert split.args[3] == k and heads_by_width == (k, 16 // heads)
        assert merge.args[3] == k * per_index


def test_size_used_as_a_value_freezes_and_names_the_op():
    _, x, a = _analysis("non_size_use")
    fc = a.group("fc")
    assert not fc.prunable and a.group("embed").prunable
    (reason,) = fc.frozen
    assert "function pow" in reason and "(in 'attn')" in reason and "size 2 of 'fc'" in reason
    check_plan(a, fxprune.uniform_plan(a, 0.5, multiple=1), x)


class _Compare(nn.Module):
    """``C == 8`` feeds an assert: a size used as a value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.fc(x)
        torch._assert(t.shape[-1] == 8, "eight channels")
        return self.head(t)


class _ViewFromShape(nn.Module):
    """``x.view(y.shape)``: a whole shape as one size argument, read off another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.head_a = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x).reshape(-1, 8).view(y.shape)  # b's channels, sizes of a
        return self.head(torch.relu(z)) + self.head_a(y)


class _Arange(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.fc(x)
        return self.head(t * torch.arange(t.size(-1), dtype=t.dtype))


@pytest.mark.parametrize(("cls", "op"), [(_Compare, "function eq"), (_Arange, "arange")])
def test_other_uses_freeze(cls, op):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = fxprune.analyze(cls().eval(), x)
    assert not a.group("fc").prunable
    assert any(op in r for r in a.group("fc").frozen)


def test_whole_shape_argument_is_rewritten_per_dim():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = fxprune.analyze(make_sensitive(_ViewFromShape().eval()), x)
    assert a.group("a").prunable and a.group("b").prunable
    plan = fxprune.Plan({"a": (0, 1, 2, 3, 4), "b": (2, 3, 6)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    (view,) = _calls(pruned, "view")
    batch, tokens, channels = view.args[1]
    assert isinstance(batch, fx.Node) and isinstance(tokens, fx.Node) and channels == 3


def test_reshape_as_takes_the_other_tensors_planned_shape():
    """``bn(y.flatten(0, 1)).reshape_as(y)`` keeps its form (same channels); ``b``'s channels
    ``view_as(y)`` become ``view(...)`` with b's pruned count where it differs from y's."""
    _, x, a = _analysis("linear_norm")
    assert a.group("a").prunable and a.group("b").prunable
    plan = fxprune.Plan({"a": (0, 1, 2, 3, 4), "b": (1, 6)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert len(_calls(pruned, "reshape_as")) == 1 and not _calls(pruned, "view_as")
    (view,) = _calls(pruned, "view")
    assert view.args[3] == 2 and all(isinstance(v, fx.Node) for v in view.args[1:3])


class _Values(fx.Interpreter):
    """Runs a GraphModule and keeps every int or shape a node computes, by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, (int, torch.Size)):
            self.values[n.name] = tuple(out) if isinstance(out, torch.Size) else out
        return out


@pytest.mark.parametrize("name", ["tokens", "spatial_reduction", "multi_head", "multi_head_wide"])
def test_size_values_are_what_the_pruned_model_reads(name):
    """``SizeExpr.value`` under a plan is the int the pruned model computes at that node."""
    _, x, a = _analysis(name)

    @SETTINGS
    @given(plan=plans(a, blocks=False))
    def run(plan):
        pruned = fxprune.prune(a, plan)
        keep = a.spaces.keep_units(plan.kept)
        interp = _Values(pruned)
        with torch.no_grad():
            interp.run(x)
        checked = 0
        for node in a.gm.graph.nodes:
            value = node.meta.get(SIZES)
            if value is None or node.name not in interp.values:
                continue
            want = (
                tuple(v.value(keep) for v in value)
                if isinstance(value, tuple)
                else value.value(keep)
            )
            assert interp.values[node.name] == want, node.name
            checked += 1
        assert checked

    run()


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_front_end_prunes_the_same_models(name):
    """Under torch.export the sizes are ``x.size(d)`` calls and python arithmetic (or constants
    where export specialised them), ``reshape_as`` a method again: the same groups stay
    prunable, and random plans equal the oracle. A count export folded into a constant keeps its
    analysed value in the pruned model, as masking does, so ``non_size_use`` prunes there."""
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model = make_sensitive(cls().eval())
    x = torch.randn(shape)
    fx_groups = {g.name: (g.size, g.prunable) for g in fxprune.analyze(model, x).groups}
    a = fxprune.analyze(model, x, frontend="export")
    groups = {g.name: (g.size, g.prunable) for g in a.groups}
    if name == "non_size_use":
        assert groups["fc"] == (8, True) and fx_groups["fc"] == (8, False)
    else:
        assert groups == fx_groups

    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=plans(a, blocks=False))
    def run(plan):
        check_plan(a, plan, x)

    run()


class _UnflattenLast(nn.Module):
    """``x.unflatten(-1, (2, C // 2))``: a negative dim counts from the end of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y.unflatten(-1, (2, y.shape[-1] // 2))  # (B, N, 2, 8): channels on the 8
        return self.b(y.mean(-2))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unflatten_at_a_negative_dim_follows_its_sizes(frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = fxprune.analyze(make_sensitive(_UnflattenLast().eval()), x, frontend=frontend)
    assert not [r for g in a.groups for r in g.frozen if "unflatten" in r]
    g = a.group("a")  # each of the 8 positions, in both halves
    assert g.size == 8 and g.prunable and not g.inexact
    check_random_plans(a, x)
