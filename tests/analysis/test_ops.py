"""The op table: one registration teaches the channel analysis, the reorder and the segment pass."""

import operator
import sys

import pytest
import torch
from helpers import check_random_plans, make_sensitive
from metaformer_models import PowForms
from torch import fx, nn

import fxprune
from fxprune.analysis import ops
from fxprune.analysis.channel_rules import lookup_rule, passthrough


def _erfish(x: torch.Tensor) -> torch.Tensor:
    return torch.erf(x)


torch.fx.wrap("_erfish")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(_erfish(self.a(x)))


def _node(gm: fx.GraphModule, target) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


@pytest.fixture
def restore_table():
    saved = dict(ops._TABLE)
    yield
    ops._TABLE.clear()
    ops._TABLE.update(saved)


def test_unknown_op_freezes_and_one_registration_teaches_every_pass(restore_table):
    x = torch.randn(1, 3, 8, 8)
    before = fxprune.analyze(Net(), x)
    assert before.group("a").frozen  # unknown: frozen, with the op named
    assert "_erfish" in before.group("a").frozen[0]
    node = _node(before.gm, _erfish)
    assert lookup_rule(node, before.gm) is None
    assert ops.traits_of(node, before.gm) == ops.OpTraits()

    ops.register_op(_erfish, rule=passthrough, commutes=True, channelwise=True)
    after = fxprune.analyze(Net(), x)
    assert not after.group("a").frozen
    node = _node(after.gm, _erfish)
    assert lookup_rule(node, after.gm) is passthrough
    assert ops.traits_of(node, after.gm) == ops.OpTraits(commutes=True, channelwise=True)
    plan = fxprune.uniform_plan(after, keep=0.5, multiple=1)
    pruned = fxprune.prune(after, plan)
    assert pruned.get_submodule("a").out_channels == 4
    torch.testing.assert_close(pruned(x), fxprune.masked_forward(after, plan, x))


def test_registration_only_changes_what_is_given(restore_table):
    entry = ops.lookup(operator.add)
    assert entry.rule is not None and entry.traits.binary
    ops.register_op(operator.add, commutes=False)
    again = ops.lookup(operator.add)
    assert again.rule is entry.rule and again.traits.binary and not again.traits.commutes


def test_module_entries_follow_the_mro_to_the_nearest_class_with_the_field():
    class MyBN(nn.BatchNorm2d):
        pass

    assert ops.lookup(MyBN, lambda e: e.rule is not None).rule is not None
    assert ops.lookup(MyBN, lambda e: e.pruner is not None).pruner is not None
    assert ops.lookup(MyBN).traits.channelwise


def test_out_of_place_twins():
    g = fx.Graph()
    x = g.placeholder("x")
    assert ops.out_of_place(g.call_method("add_", (x, x))) == "add"
    assert ops.out_of_place(g.call_method("__iadd__", (x, x))) is None
    assert ops.out_of_place(g.call_function(operator.iadd, (x, x))) is operator.add
    assert ops.out_of_place(g.call_function(operator.add, (x, x))) is None


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pow_and_square_are_elementwise_on_tensors_and_sizes_stay_sizes(frontend):
    """``x ** 2``, ``x.pow(3)``, ``torch.pow``, ``2 ** x``, ``x ** y``, ``torch.square`` (and their
    ATen forms) pass channels through; ``x ** y`` ties its operands' channels like ``x * y``."""
    torch.manual_seed(0)
    model, x = make_sensitive(PowForms().eval()), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x, frontend=frontend)
    pows = [n for n in a.gm.graph.nodes if n.target in (operator.pow, torch.pow, "pow")]
    assert len(pows) == (6 if frontend == "fx" else 5)  # export folds d.shape[1] ** -0.5
    tensor_pows = [n for n in pows if "tensor_meta" in n.meta]
    assert len(tensor_pows) == 5
    for n in tensor_pows:
        assert ops.traits_of(n, a.gm) == ops.OpTraits(commutes=True, channelwise=True, binary=True)
    assert not any("unsupported op" in r for g in a.groups for r in g.frozen)
    assert [(g.name, g.size) for g in a.groups if g.prunable] == [("a", 6), ("c", 8)] + (
        [] if frontend == "fx" else [("d", 8)]
    )
    assert "b" in a.group("a").roots and not any(g.inexact for g in a.groups)
    if frontend == "fx":  # a count read off d, raised to a power: a size used as a value
        (reason,) = a.group("d").frozen
        assert "function pow" in reason and "size 1 of 'd'" in reason
    check_random_plans(a, x)


def test_lazy_entries_wait_for_their_module_to_be_imported(restore_table, monkeypatch):
    import types

    monkeypatch.delitem(ops._LAZY, ("fxprune_test_lazy", "fn"), raising=False)
    ops.register_lazy("fxprune_test_lazy", "fn", rule=passthrough, channelwise=True)
    assert ("fxprune_test_lazy", "fn") in ops._LAZY  # not imported: nothing to key it by
    module = types.ModuleType("fxprune_test_lazy")
    module.fn = _erfish
    monkeypatch.setitem(sys.modules, "fxprune_test_lazy", module)
    a = fxprune.analyze(Net(), torch.randn(1, 3, 8, 8))  # the first lookup registers it
    assert ("fxprune_test_lazy", "fn") not in ops._LAZY
    assert not a.group("a").frozen
    assert lookup_rule(_node(a.gm, _erfish), a.gm) is passthrough


class _MaskAdds(nn.Module):
    """timm's ``maybe_add_mask`` without a mask (the scores alone) and with one (an add)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        from timm.layers.attention import maybe_add_mask

        y = maybe_add_mask(self.a(x), None)
        return self.b(maybe_add_mask(y, self.c(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_timm_maybe_add_mask_is_an_add_with_an_optional_operand(frontend):
    pytest.importorskip("timm")
    from timm.layers.attention import maybe_add_mask

    torch.manual_seed(0)
    model, x = make_sensitive(_MaskAdds().eval()), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x, frontend=frontend)
    if frontend == "fx":  # fx-wrapped by timm: two leaf calls, each known to the op table
        calls = [n for n in a.gm.graph.nodes if n.target is maybe_add_mask]
        assert len(calls) == 2
        for n in calls:
            assert ops.traits_of(n, a.gm) == ops.OpTraits(
                commutes=True, channelwise=True, binary=True
            )
    (g,) = [g for g in a.groups if g.prunable]
    assert g.size == 8 and {"a", "c"} <= set(g.roots) and not g.frozen and not g.inexact
    check_random_plans(a, x)
