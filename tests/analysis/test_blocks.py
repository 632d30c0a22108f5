"""Removable residual blocks: counts on real models and the single-entry/single-exit rules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import check_plan, make_sensitive
from torch import nn

import fxprune
from fxprune.analysis.plans import random_plan


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet50", 12),
        ("resnet18", 5),
        ("mobilenet_v2", 10),
        ("convnext_tiny", 18),
        ("efficientnet_b0", 9),
    ],
)
def test_block_counts(name, expected):
    a = fxprune.analyze(torchvision.models.get_model(name), torch.randn(1, 3, 64, 64))
    assert len(a.blocks) == expected


def test_resnet_blocks_have_identity_shortcut_and_internal_groups():
    a = fxprune.analyze(torchvision.models.resnet50(), torch.randn(1, 3, 64, 64))
    first = a.blocks[0]  # layer1.1: layer1.0 has a downsample branch, so it is not removable
    assert "layer1_1_conv1" in first.region and "layer1_0_conv1" not in first.region
    assert a.internal_groups(first) == ["layer1.1.conv1", "layer1.1.conv2"]


class Projection(nn.Module):
    """Shortcut through a conv: ``add(p(x), f(x))`` is not removable (no identity)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(4, 4, 3, padding=1)
        self.p = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.p(x) + self.f(x)


class Leaky(nn.Module):
    """A branch whose inner value is also used outside: not single-exit."""

    def __init__(self):
        super().__init__()
        self.f1 = nn.Conv2d(4, 4, 1)
        self.f2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.f1(x)
        return x + self.f2(h), h


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        inner = x + self.a(x)
        return x + self.b(inner)


def test_projection_shortcut_is_not_a_block():
    assert fxprune.analyze(Projection(), torch.randn(1, 4, 6, 6)).blocks == []


def test_leaking_branch_is_not_a_block():
    assert fxprune.analyze(Leaky(), torch.randn(1, 4, 6, 6)).blocks == []


@pytest.mark.parametrize("removed", [(0,), (1,), (0, 1)])
def test_nested_blocks_remove_exactly(removed):
    model = Nested().eval()
    x = torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == 2
    plan = fxprune.Plan({}, tuple(a.blocks[i].name for i in removed), a.signature)
    check_plan(a, plan, x, tol=1e-6)


def test_removing_all_resnet_blocks_matches_oracle():
    model = make_sensitive(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 64, 64)
    a = fxprune.analyze(model, x)
    plan = fxprune.Plan({}, tuple(b.name for b in a.blocks), a.signature)
    pruned = check_plan(a, plan, x)
    names = dict(pruned.named_modules())
    assert "layer1.1.conv1" not in names and "layer1.1.bn2" not in names  # branch modules gone
    assert "layer1.1.relu" in names  # the post-add ReLU is outside the block and stays


class TimmStyle(nn.Module):
    """``x = self.drop_path(self.gamma * self.block(x)) + self.shortcut(x)``: an nn.Identity
    shortcut, a layer-scale parameter multiply and a rank assert inside the branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.drop_path = nn.Identity()
        self.shortcut = nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        torch._assert(y.ndim == 4, f"expected 4D input (got {y.ndim}D input)")
        y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(y) + self.shortcut(x)


def test_identity_shortcut_layer_scale_and_rank_assert_make_a_block():
    model, x = TimmStyle().eval(), torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == 1 and a.blocks[0].shortcut == "stem"
    pruned = check_plan(a, fxprune.Plan({}, (a.blocks[0].name,), a.signature), x, tol=1e-6)
    assert "conv" not in dict(pruned.named_modules())  # the branch is gone, assert and all


class StaticBias(nn.Module):
    """A branch biased by an MLP of a constant table (Swin V2's ``cpb_mlp``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("table", torch.randn(4, 2))
        self.mlp = nn.Linear(2, 1)

    def forward(self, x):
        x = self.stem(x)
        bias = self.mlp(self.table).reshape(1, 4, 1, 1)
        return x + self.conv(x) * bias


def test_static_feeder_of_a_branch_dies_with_it():
    model, x = StaticBias().eval(), torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == 1 and {"mlp", "conv"} <= a.blocks[0].region
    pruned = check_plan(a, fxprune.Plan({}, (a.blocks[0].name,), a.signature), x, tol=1e-6)
    assert not {"conv", "mlp"} & set(dict(pruned.named_modules()))


class UnusedShape(nn.Module):
    """``B, N, C = x.shape`` with ``N`` unused, as timm's attention: no value leaks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        b, _n, c = x.shape
        return x + self.fc(x).reshape(b, -1, c)


def test_unused_shape_read_does_not_stop_a_block():
    model, x = UnusedShape().eval(), torch.randn(1, 3, 4)
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == 1
    pruned = check_plan(a, fxprune.Plan({}, (a.blocks[0].name,), a.signature), x, tol=1e-6)
    assert "fc" not in dict(pruned.named_modules())


class AssertedBranch(nn.Module):
    """A branch asserting a size of its own tensor (timm's SelectiveKernel): the assert reads
    only the branch, so it goes with it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        paths = torch.stack([self.a(x), self.b(x)], dim=1)
        torch._assert(paths.shape[1] == 2, "two paths")
        return x + paths.sum(1)


def test_an_assert_on_a_removed_branch_goes_with_it():
    model, x = AssertedBranch().eval(), torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == 1
    pruned = check_plan(a, fxprune.Plan({}, (a.blocks[0].name,), a.signature), x, tol=1e-6)
    assert not {"a", "b"} & set(dict(pruned.named_modules()))
    assert not [n for n in pruned.graph.nodes if n.target is torch._assert]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("efficientnet_b0", 9), ("mobilenetv3_large_100", 10), ("convnext_atto", 11),
     ("resnet18", 5)],
)  # fmt: skip
def test_timm_drop_path_blocks_remove_like_the_oracle(name, expected):
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1)
    model = make_sensitive(model, x).eval()
    a = fxprune.analyze(model, x)
    assert len(a.blocks) == expected
    plan = random_plan(a, 0, block_prob=0.5)
    assert plan.removed_blocks
    check_plan(a, plan, x)
