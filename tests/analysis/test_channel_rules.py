"""Each op rule on a small hand-built module: group structure, and pruned == masked numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    check_plan,
    check_planned_shapes,
    check_random_plans,
    check_unconstrained,
    make_sensitive,
    rel_err,
)
from hypothesis import HealthCheck, given, settings
from size_models import SpatialReduction
from strategies import plans
from torch import nn

import fxprune

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Concat(nn.Module):
    """Concat offsets: the consumer's input columns are [a | b] with b offset by a's width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 7, 1)
        self.bn = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


class SplitChunk(nn.Module):
    """split and chunk of a produced tensor, each part consumed and re-joined by add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 6, 1)
        self.d = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = torch.split(y, [6, 6], dim=1)
        r = self.b(p) + self.c(q)
        s, t = r.chunk(2, dim=1)
        u = torch.cat([s, t], 1)[:, 1:5]
        return self.d(u)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class ViewLinear(nn.Module):
    """A literal channel count in view(): must be rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.conv(x), 1)
        return self.fc(y.view(x.shape[0], 6))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.b = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        return self.b(self.dw(self.g(self.a(x))))


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with two outputs per input (PiT's pooling, FastViT's downsampling),
    then a residual over its outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.dw(self.a(x))))
        return self.b(y + self.c(y))


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * s)


class Shuffle(nn.Module):
    """ShuffleNetV2's channel shuffle: view/transpose/view ties the two halves index-wise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.c(y)


class SharedConv(nn.Module):
    """One conv applied twice (shared weights): both call sites prune alike."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.shared(F.relu(self.shared(y))))


class TiedWeights(nn.Module):
    """Two modules holding one weight Parameter (tied weights): pruned alike, still tied."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.cat([self.a(y), self.b(y)], 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.scale * self.c2(F.relu(self.bn(self.c1(y))))
        return self.head(y)


class ChannelsLastLN(nn.Module):
    """ConvNeXt style: permute to channels-last, LayerNorm + Linear MLP, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y))))
        return self.head(y.permute(0, 3, 1, 2))


class Unknown(nn.Module):
    """An op fxprune has no rule for (a cumulative sum over channels): what it touches is
    frozen. (A matmul over channels, ``yᵀ @ y``, is followed: it contracts both alike.)"""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = self.a(x).flatten(2)
        z = torch.cumsum(y, 1)
        return self.c(self.b(x)) + z.mean()


class SplitPieces(nn.Module):
    """tensor_split by indices, and a split whose one-channel first piece nobody reads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = torch.tensor_split(y, [2], dim=1)
        _, rest = torch.split(y, [1, 5], 1)
        return self.b(p) + self.c(q) + self.d(rest)


class RowGate(nn.Module):
    """A gate with channels of its own along H (a slice of ``fc``'s features viewed as rows),
    broadcast along ``a``'s channels: pruning ``fc`` would shrink the product along H."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.fc = nn.Linear(8, 10)
        self.b = nn.Conv2d(12, 2, 1)
        self.h = nn.Linear(10, 2)

    def forward(self, x):
        f = self.fc(x.mean((1, 3)))
        gate = f[:, :8].view(x.shape[0], 1, 8, 1)
        return self.b(self.a(x) * gate).mean((2, 3)) + self.h(f)


class SliceBroadcast(nn.Module):
    """``y - y[:, k:k+1]``: one channel of ``a`` broadcast against all of ``a`` (issue 16)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 7, 1)
        self.bn = nn.BatchNorm2d(7)
        self.b = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        y = self.bn(self.a(x))
        return self.b(y - y[:, 2:3])


class _Centre(torch.autograd.Function):
    """A custom autograd Function; fx traces through its forward (the backward is not kept)."""

    @staticmethod
    def forward(ctx, y):
        return y - y[:, 2:3]

    @staticmethod
    def backward(ctx, grad):
        return grad - grad.sum(1, keepdim=True)


class FunctionSliceBroadcast(SliceBroadcast):
    """The same broadcast, traced out of a custom ``autograd.Function``."""

    def forward(self, x):
        return self.b(_Centre.apply(self.bn(self.a(x))))


CASES = {
    "concat": (Concat, (1, 3, 8, 8)),
    "split_chunk": (SplitChunk, (1, 3, 8, 8)),
    "flatten_linear": (FlattenLinear, (2, 3, 8, 8)),
    "view_linear": (ViewLinear, (2, 3, 8, 8)),
    "grouped": (Grouped, (1, 3, 8, 8)),
    "depthwise_multiplier": (DepthwiseMultiplier, (1, 3, 8, 8)),
    "se": (SE, (1, 3, 8, 8)),
    "shuffle": (Shuffle, (1, 3, 8, 8)),
    "shared": (SharedConv, (1, 3, 8, 8)),
    "residual": (Residual, (1, 3, 8, 8)),
    "tied": (TiedWeights, (1, 3, 8, 8)),
    "channels_last_ln": (ChannelsLastLN, (1, 3, 8, 8)),
    "unknown": (Unknown, (1, 3, 8, 8)),
    "split_pieces": (SplitPieces, (1, 3, 8, 8)),
    "row_gate": (RowGate, (1, 3, 8, 8)),
    "slice_broadcast": (SliceBroadcast, (1, 3, 8, 8)),
    "function_slice_broadcast": (FunctionSliceBroadcast, (1, 3, 8, 8)),
    "spatial_reduction": (SpatialReduction, (2, 3, 8, 8)),  # PVT: sizes read off x.shape
}


def _analysis(name):
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model = make_sensitive(cls().eval())
    x = torch.randn(shape)
    return model, x, fxprune.analyze(model, x)


def _sizes(a):
    return {g.name: (g.size, g.prunable, bool(g.inexact)) for g in a.groups}


def test_concat_structure():
    _, _, a = _analysis("concat")
    sizes = _sizes(a)
    assert sizes["a"] == (5, True, False) and sizes["b"] == (7, True, False)
    rec = next(r for r in a.spaces.layers if r.target == "c")
    # consumer input columns: the first five are a's units, the last seven b's
    assert a.spaces.groups_of(rec.in_units[:5]) == [[g.name for g in a.groups].index("a")]
    assert a.spaces.groups_of(rec.in_units[5:]) == [[g.name for g in a.groups].index("b")]


def test_concat_offsets_exact():
    _, x, a = _analysis("concat")
    plan = fxprune.Plan({"a": (0, 4), "b": (1, 2, 6)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert pruned.c.in_channels == 5 and pruned.bn.num_features == 5


def test_split_chunk_slice_rewrite():
    _, x, a = _analysis("split_chunk")
    # b and c outputs are added: one group of 6; a is one group of 12 split into two halves
    sizes = _sizes(a)
    assert sizes["a"][0] == 12 and sizes["b"][0] == 6
    plan = fxprune.Plan({"a": (0, 1, 7, 11), "b": (0, 2, 3, 5)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert "split" in pruned.code


def test_flatten_linear_maps_channel_to_hw_features():
    _, x, a = _analysis("flatten_linear")
    plan = fxprune.Plan({"conv": (1, 3, 4)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert pruned.fc.in_features == 3 * 16


def test_view_literal_rewritten():
    _, x, a = _analysis("view_linear")
    pruned = check_plan(a, fxprune.Plan({"conv": (0, 5)}, (), a.signature), x)
    assert pruned.fc.in_features == 2


def test_grouped_conv_equal_count_rule():
    _, x, a = _analysis("grouped")
    ga, gg = a.group("a"), a.group("g")
    assert [len(p) for p in ga.equal_count[0]] == [2, 2, 2, 2]
    assert [len(p) for p in gg.equal_count[0]] == [3] * 4
    # one index per input group, two per output group; dw follows g's space
    plan = fxprune.Plan({"a": (0, 3, 4, 7), "g": (0, 2, 3, 4, 7, 8, 10, 11)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert (pruned.g.in_channels, pruned.g.out_channels, pruned.g.groups) == (4, 8, 4)
    assert pruned.dw.groups == pruned.dw.in_channels == 8
    with pytest.raises(fxprune.PlanError, match="same number of kept"):
        fxprune.Plan({"a": (0, 1, 2, 3)}, (), a.signature).validate(a)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_depthwise_multiplier_prunes_each_input_with_its_outputs(frontend):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    model = make_sensitive(DepthwiseMultiplier().eval())
    a = fxprune.analyze(model, x, frontend=frontend)
    (g,) = [g for g in a.groups if g.prunable and g.size == 4]  # a's 4 units, each 2 of dw's
    assert not g.frozen and not g.inexact and set(g.roots) == {"a", "c"}  # c pairs via the add
    assert {gr.name for gr in a.groups if gr.prunable} == {g.name}
    plan = fxprune.Plan({g.name: (1, 3)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    dw = pruned.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (2, 4, 2)
    assert torch.equal(dw.weight, model.dw.weight[[2, 3, 6, 7]])
    assert pruned.get_submodule("c").in_channels == pruned.get_submodule("c").out_channels == 4
    check_random_plans(a, x)
    assert "c" in a.consumers  # reads each kept input's two outputs together
    for seed in range(3):  # per-consumer masks, reordered, padded and segmented: the oracle
        check_unconstrained(a, x, seed)


def test_se_couples_gate_and_features():
    _, x, a = _analysis("se")
    names = [g.name for g in a.groups]
    assert "fc2" not in names  # fc2's output joins conv's group through the multiply
    assert set(a.group("conv").roots) == {"conv", "fc2"}
    check_plan(a, fxprune.Plan({"conv": (1, 2, 5), "fc1": (0, 3)}, (), a.signature), x)


def test_channel_shuffle_ties_halves():
    _, x, a = _analysis("shuffle")
    g = a.group("a")
    assert set(g.roots) == {"a", "b"} and g.size == 4  # a[i] and b[i] kept together
    pruned = check_plan(a, fxprune.Plan({"a": (0, 3)}, (), a.signature), x)
    assert pruned.c.in_channels == 4


def test_shared_module_prunes_consistently():
    _model, x, a = _analysis("shared")
    g = a.group("stem")
    assert "shared" in g.roots  # input and output of the shared conv are one space
    pruned = check_plan(a, fxprune.Plan({"stem": (0, 2, 5)}, (), a.signature), x)
    assert pruned.shared.in_channels == pruned.shared.out_channels == 3


def test_tied_weights_stay_tied():
    _, x, a = _analysis("tied")
    assert "b" not in [g.name for g in a.groups]  # b's output units are a's
    pruned = check_plan(a, fxprune.Plan({"a": (1, 4), "stem": (0, 2, 3)}, (), a.signature), x)
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (2, 3, 3, 3)


def test_residual_layer_scale_and_block():
    _, x, a = _analysis("residual")
    assert [b.shortcut for b in a.blocks] == ["stem"]
    assert a.internal_groups(a.blocks[0]) == ["c1"]
    plan = fxprune.Plan({"stem": (0, 1, 6), "c1": ()}, (a.blocks[0].name,), a.signature)
    pruned = check_plan(a, plan, x)
    assert not hasattr(pruned, "c1") and pruned.head.in_channels == 3
    plan = fxprune.Plan({"stem": (2, 3, 7)}, (), a.signature)
    pruned = check_plan(a, plan, x)
    assert pruned.scale.shape == (3, 1, 1)


def test_layer_norm_is_prunable_but_inexact():
    _, x, a = _analysis("channels_last_ln")
    stem = a.group("stem")
    assert stem.prunable and stem.inexact and not a.group("fc1").inexact
    plan = fxprune.Plan({"stem": (0, 3, 4, 7)}, (), a.signature)
    pruned = fxprune.prune(a, plan)
    assert pruned.ln.normalized_shape == (4,) and pruned(x).shape == (1, 2, 8, 8)
    check_plan(a, fxprune.Plan({"fc1": (1, 5, 9)}, (), a.signature), x)


def test_unknown_op_freezes_what_it_touches():
    _, _x, a = _analysis("unknown")
    assert not a.group("a").prunable
    assert any("cumsum" in r for r in a.group("a").frozen)
    assert a.group("b").prunable
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.Plan({"a": (0,)}, (), a.signature).validate(a)


def test_split_pieces_rewrite_with_pruned_channels():
    """Piece sizes follow the kept channels: tensor_split's indices, and a one-channel piece
    that nobody reads (it does not freeze the group: only a tensor that is used can break)."""
    _, x, a = _analysis("split_pieces")
    assert a.group("a").prunable
    pruned = check_plan(a, fxprune.Plan({"a": (0, 3, 4)}, (), a.signature), x)
    assert (pruned.b.in_channels, pruned.c.in_channels, pruned.d.in_channels) == (1, 2, 2)
    pruned = check_plan(a, fxprune.Plan({"a": (1, 2, 5)}, (), a.signature), x)
    assert (pruned.b.in_channels, pruned.c.in_channels, pruned.d.in_channels) == (1, 2, 3)


def test_gate_broadcast_along_channels_freezes_its_own_channels():
    _, x, a = _analysis("row_gate")
    assert a.group("a").prunable
    assert any("broadcasts it along dim 1" in r for r in a.group("fc").frozen)
    check_plan(a, fxprune.Plan({"a": (0, 5, 11)}, (), a.signature), x)


@pytest.mark.parametrize("name", ["slice_broadcast", "function_slice_broadcast"])
def test_one_channel_slice_broadcast_freezes_its_group(name):
    """Dropping channel 2 would leave ``y[:, 2:3]`` empty, and the subtraction could no longer
    broadcast it: the group is kept whole, and the report says why."""
    _, x, a = _analysis(name)
    g = a.group("a")
    assert not g.prunable
    assert any("getitem" in r and "one channel" in r for r in g.frozen), g.frozen
    assert a.group("b").frozen == ("model output",)
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.Plan({"a": (0, 1, 3, 4, 5, 6)}, (), a.signature).validate(a)
    # how users met it: channel 2 scores lowest, and uniform_plan dropped it
    scores = {"a": np.array([5.0, 4.0, 0.0, 3.0, 2.0, 6.0, 7.0])}
    plan = fxprune.uniform_plan(a, 0.5, multiple=1, scores=scores)
    assert "a" not in plan.kept
    check_plan(a, plan, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_plans_equal_masking(name):
    _, x, a = _analysis(name)

    @SETTINGS
    @given(plan=plans(a))
    def run(plan):
        pruned = check_plan(a, plan, x)
        out = pruned(x.requires_grad_(False))
        out.float().sum().backward()  # the pruned model trains

    run()


def test_oracle_comparison_detects_a_wrong_rewrite():
    """Negative control: the pruned model of one plan must not match another plan's oracle."""
    _, x, a = _analysis("concat")
    p1 = fxprune.Plan({"a": (0, 1)}, (), a.signature)
    p2 = fxprune.Plan({"a": (2, 3)}, (), a.signature)
    with torch.no_grad():
        assert rel_err(fxprune.prune(a, p1)(x), fxprune.masked_forward(a, p2, x)) > 1e-3


def test_planned_shapes_check_detects_a_wrong_width():
    """Negative control: a model pruned for one plan fails the channel-count check of another."""
    _, _, a = _analysis("concat")
    pruned = fxprune.prune(a, fxprune.Plan({"a": (0, 1)}, (), a.signature))
    check_planned_shapes(a, fxprune.Plan({"a": (0, 1)}, (), a.signature), pruned)
    with pytest.raises(fxprune.FxpruneError, match=r"'a' \(node a\): pruned"):
        check_planned_shapes(a, fxprune.Plan({"a": (0, 1, 2)}, (), a.signature), pruned)


class WrittenOutNorms(nn.Module):
    """Norms written with var / std over channels (timm's RmsNorm2d and LayerNorm2d fallbacks),
    and a spatial std: the first two make the stem's group inexact, the last is per channel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y / torch.sqrt(torch.var(y, dim=1, unbiased=False, keepdim=True) + 1e-5)
        y = y / (y.std(1, True, True) + 1e-5)
        z = self.mid(y)
        z = z * z.std(dim=(2, 3), keepdim=True)
        return self.head(z)


def test_var_and_std_are_reductions():
    torch.manual_seed(0)
    model, x = WrittenOutNorms().eval(), torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    assert a.group("stem").prunable and a.group("stem").inexact
    assert a.group("mid").prunable and not a.group("mid").inexact  # spatial std: exact
    pruned = check_plan(a, fxprune.Plan({"mid": (0, 2, 5)}, (), a.signature), x, tol=1e-5)
    assert pruned.mid.out_channels == 3
    stem = fxprune.prune(a, fxprune.Plan({"stem": (1, 4, 6, 7)}, (), a.signature))
    assert stem(x).shape == (1, 2, 6, 6) and stem.stem.out_channels == 4
